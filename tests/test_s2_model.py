"""S2 models: a dense checkpoint in an S2 model with stride 1 is the dense model; Hugging Face
import into and export of S2 models; a whole tiny S2 hybrid under CP=P equals CP=1."""

import dataclasses
import json
import os

import pytest
import torch
import torch.distributed as dist

from models import ModelConfig, Transformer
from models.context import SingleDeviceContext
from models.hf_io import load_hf_model, save_hf_checkpoint
from parallel.context import CPContext
from parallel.sharding import shard_batch
from parallel.spawn import run_distributed
from parallel.strategies import build_strategies

S2 = dict(s2_block=16, s2_stride=2, s2_local=1)


def _dense(**kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, **kw)).double()


@pytest.mark.filterwarnings("ignore:S2 pattern")  # homogeneous heads leave blocks unseen, on purpose
def test_stride_one_is_the_dense_model():
    dense = _dense()
    sparse = Transformer(dataclasses.replace(dense.cfg, mixer_pattern=["s2"], s2_block=16, s2_stride=1)).double()
    sparse.load_state_dict(dense.state_dict(), strict=True)  # same parameters, same names
    ids = torch.randint(0, 257, (2, 75))
    cu = torch.tensor([0, 30, 75, 80, 150])
    ctx = SingleDeviceContext(2, 75, cu, block=16)
    assert torch.equal(sparse(ids, None, ctx), dense(ids, None, ctx))  # bit for bit
    sparse_s4 = Transformer(dataclasses.replace(sparse.cfg, s2_stride=2, s2_homogeneous=True)).double()
    sparse_s4.load_state_dict(dense.state_dict())
    assert not torch.allclose(sparse_s4(ids, None, ctx), dense(ids, None, ctx))  # the pattern bites


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_hf_import_into_s2_and_export_round_trip(model_type, tmp_path):
    dense = _dense()
    save_hf_checkpoint(dense, str(tmp_path / "dense"), model_type=model_type)
    s2 = load_hf_model(str(tmp_path / "dense"), mixer_pattern=["s2", "softmax"], s2_dense_heads=[1], **S2).double()
    ids = torch.randint(0, 257, (1, 64))
    out = s2(ids)
    save_hf_checkpoint(s2, str(tmp_path / "s2"), model_type=model_type)
    hf = json.load(open(os.path.join(tmp_path, "s2", "config.json")))
    assert hf["longctx_s2"]["mixer_pattern"] == ["s2", "softmax"] and hf["longctx_s2"]["dense_heads"] == [1]
    back = load_hf_model(str(tmp_path / "s2")).double()
    assert back.cfg.mixer_pattern == ["s2", "softmax"] and back.cfg.s2_stride == 2 and back.cfg.s2_dense_heads == [1]
    assert (back(ids) - out).abs().max() < 1e-12


def _batch(n, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids, labels = (torch.randint(0, 257, (b, n), generator=g) for _ in range(2))
    cu = torch.tensor(sorted({0, 5, n // 3, n - 7, n, n + 1, n + n // 2, 2 * n}))
    flat = torch.arange(b * n)
    doc = torch.searchsorted(cu, flat, right=True) - 1
    return {"input_ids": ids, "labels": labels, "positions": (flat - cu[doc]).view(b, n), "cu_seqlens": cu}


def _loss_and_grads(rank, world, runs):
    """For each (layout, sparse strategy): loss and all-reduced gradients of a tiny S2 hybrid."""
    out = []
    for layout, strategy in runs:
        torch.manual_seed(0)
        cfg = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=4, mixer_pattern=["s2", "s2", "softmax"], **S2)
        model = Transformer(cfg).double()
        n = 96
        batch = _batch(n)
        local = shard_batch(batch, rank, world, layout)
        strategies = build_strategies({"sparse": strategy, "softmax": "allgather"}, {}, cfg.kinds())
        group = dist.group.WORLD if world > 1 else None
        ctx = CPContext(strategies, group, rank, world, layout, n, 2, batch["cu_seqlens"], block=16)
        logits = model(local["input_ids"], local["positions"], ctx)
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), local["labels"].flatten(), reduction="sum")
        ce.backward()
        stats = torch.cat([ce.detach()[None]] + [p.grad.flatten() for p in model.parameters()])
        if world > 1:
            dist.all_reduce(stats)
        out.append(stats)
    return out


@pytest.mark.gloo
def test_s2_model_cp_matches_single():
    ref = run_distributed(_loss_and_grads, 1, [("contiguous", "s2")])[0][0]
    runs = [("zigzag", "s2"), ("contiguous", "s2"), ("zigzag", "ring")]
    for per_rank in run_distributed(_loss_and_grads, 3, runs):
        for stats in per_rank:
            assert (stats - ref).abs().max() < 1e-10
