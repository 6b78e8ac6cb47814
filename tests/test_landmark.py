"""Landmark attention (models/landmark_attention.py) against the authors' grouped softmax, the
planted wrong-group gate it catches, packed documents, checkpoint import / export."""

import math

import pytest
import torch

from models import ModelConfig, Transformer
from models.context import SingleDeviceContext
from models.landmark_attention import LandmarkAttention, landmark_core

EVERY = 4  # regular tokens per block: blocks of 5, landmarks at positions 4, 9, 14, ...


def grouped_softmax_ref(s, is_mem, every):
    """The training-form probabilities of epfml/landmark-attention llama/llama_mem.py, rebuilt
    step by step for one unpacked row: s [H, T, T] scores, is_mem [T] landmark keys."""
    t = s.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    x = s.masked_fill(~causal, torch.finfo(s.dtype).min)
    mem_ids = torch.where(causal, (torch.cumsum(is_mem.long(), -1) - is_mem.long())[None, :], 0)  # [T, T]
    last = (mem_ids.amax(-1, keepdim=True) == mem_ids) & causal  # key in the query's block
    x = x.masked_fill(last & is_mem[None, :], torch.finfo(s.dtype).min)  # its own landmark masked
    mem = is_mem[None, :] & causal
    group_of = torch.cumsum(is_mem.long(), -1)[None, :].expand(t, t)
    bucket = 63
    resp = torch.where(last, bucket, torch.where(mem, bucket, group_of))  # [T, T]
    resp = resp.expand_as(x)
    top = torch.full((*x.shape[:-1], 64), -math.inf, dtype=x.dtype).scatter_reduce(-1, resp, x, "amax")
    e = (x - top.gather(-1, resp)).exp()
    z = torch.zeros_like(top).scatter_add(-1, resp, e)
    probs = e / z.gather(-1, resp)
    slot = torch.where(mem, group_of - 1, bucket).expand_as(x)
    group_prob = torch.zeros_like(top).scatter(-1, slot, probs)
    full = mem | last
    return probs * torch.where(full, last.to(x.dtype), group_prob.gather(-1, resp))


def test_landmark_core_matches_the_authors_grouped_softmax():
    torch.manual_seed(0)
    b, t, h, hkv, d = 2, 23, 4, 2, 8
    q = torch.randn(b, t, h, d, dtype=torch.float64)
    k, v = (torch.randn(b, t, hkv, d, dtype=torch.float64) for _ in range(2))
    idx = torch.arange(t)
    doc = torch.arange(b)[:, None].expand(b, t)
    got = landmark_core(q, k, v, idx, doc, idx, doc, every=EVERY)
    is_mem = idx % (EVERY + 1) == EVERY
    for r in range(b):
        kr = k[r].repeat_interleave(h // hkv, dim=1)
        s = torch.einsum("ihd,jhd->hij", q[r], kr) / math.sqrt(d)
        p = grouped_softmax_ref(s, is_mem, EVERY)
        want = torch.einsum("hij,jhd->ihd", p, v[r].repeat_interleave(h // hkv, dim=1))
        assert (got[r] - want).abs().max() < 1e-12


def test_planted_gate_over_the_wrong_group_fails_the_reference(monkeypatch):
    """The landmark gate normalised over every visible key instead of the current block and the
    landmarks: the reference catches it."""
    import models.landmark_attention as lm

    monkeypatch.setattr(lm, "gate_group", lambda cur, mem, old: cur | mem | old)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 23, 2, 8, dtype=torch.float64) for _ in range(3))
    idx, doc = torch.arange(23), torch.zeros(1, 23, dtype=torch.int64)
    got = lm.landmark_core(q, k, v, idx, doc, idx, doc, every=EVERY)
    s = torch.einsum("ihd,jhd->hij", q[0], k[0]) / math.sqrt(8)
    want = torch.einsum("hij,jhd->ihd", grouped_softmax_ref(s, idx % 5 == 4, EVERY), v[0])
    assert (got[0] - want).abs().max() > 1e-3


def test_packed_documents_are_independent_rows():
    """Each packed document is landmarked from its own start: the same as running it alone."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_heads=4, n_kv_heads=2, landmark_every=EVERY, mixer_pattern=["landmark"])
    m = LandmarkAttention(cfg, 0).double()
    x = torch.randn(1, 30, 32, dtype=torch.float64)
    from models.rope import Rotary

    rot = Rotary(cfg.rope, cfg.hd)
    pos = torch.cat([torch.arange(12), torch.arange(18)])[None]
    cos, sin = rot.cos_sin(pos, torch.float64)
    packed = m(x, cos, sin, SingleDeviceContext(1, 30, torch.tensor([0, 12, 30])))
    for a, e in ((0, 12), (12, 30)):
        c, s_ = rot.cos_sin(torch.arange(e - a)[None], torch.float64)
        alone = m(x[:, a:e], c, s_, SingleDeviceContext(1, e - a))
        assert (packed[:, a:e] - alone).abs().max() < 1e-12


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_landmark_imports_a_checkpoint_and_exports_it(model_type, tmp_path):
    from models.hf_io import load_hf_model, save_hf_checkpoint

    torch.manual_seed(0)
    dense = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61))
    save_hf_checkpoint(dense, str(tmp_path / "dense"), model_type=model_type)
    lm = load_hf_model(str(tmp_path / "dense"), mixer_pattern=["landmark"], landmark_every=EVERY).double()
    ids = torch.randint(0, 61, (1, 24))
    out = lm(ids)
    save_hf_checkpoint(lm, str(tmp_path / "lm"), model_type=model_type)
    back = load_hf_model(str(tmp_path / "lm")).double()
    assert back.cfg.mixer_pattern == ["landmark"] and back.cfg.landmark_every == EVERY
    assert (back(ids) - out).abs().max() < 1e-12
