"""Linear-attention mixers inside tiny hybrid models: causality, documents, chunk == naive."""

import copy

import pytest
import torch

from models import ModelConfig, Transformer
from models.context import SingleDeviceContext
from models.mixers import MIXERS as REGISTERED
from models.mixers import build_mixer
from models.rope import Rotary

MIXERS = sorted(name for name, cls in REGISTERED.items() if cls.kinds == ("linear",))  # every registered one
B, T = 2, 37
CU = torch.tensor([0, 1, 12, 30, 37, 40, 41, 74])  # length-1 docs, a doc across chunk edges


def _cfg(name, **options):
    cfg = ModelConfig(
        dim=32, n_layers=4, n_heads=2, n_kv_heads=1, vocab_size=61, mixer_pattern=[name, name, name, "softmax"]
    )
    cfg.linear_chunk_size = 8
    for key, value in options.items():
        setattr(cfg, "linear_" + key, value)
    return cfg


def _positions():
    flat = torch.arange(B * T)
    start = CU[torch.searchsorted(CU, flat, right=True) - 1]
    return (flat - start).view(B, T)


def _model(cfg, impl="chunk"):
    cfg = copy.deepcopy(cfg)
    cfg.linear_impl = impl
    torch.manual_seed(0)
    model = Transformer(cfg).double()
    model.reset_parameters(seed=0)
    return model


def _ids(seed=0):
    return torch.randint(0, 61, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", MIXERS)
def test_hybrid_model_chunk_equals_naive_and_grads_finite(name):
    cfg = _cfg(name)
    ids, ctx = _ids(), SingleDeviceContext(B, T, CU)
    fast, slow = _model(cfg, "chunk"), _model(cfg, "naive")
    out = fast(ids, _positions(), ctx)
    ref = slow(ids, _positions(), ctx)
    assert (out - ref).abs().max() < 1e-10
    out.logsumexp(-1).sum().backward()
    ref.logsumexp(-1).sum().backward()
    for (n, p), (_, pr) in zip(fast.named_parameters(), slow.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert (p.grad - pr.grad).abs().max() < 1e-10, n
    mixer_grads = [
        p.grad.abs().max()
        for n, p in fast.named_parameters()
        if ".mixer." in n and n.startswith("layers.0.") and "o_norm" not in n
    ]
    assert all(gr > 0 for gr in mixer_grads)


@pytest.mark.parametrize(
    "options",
    [
        dict(feature_map="identity"),
        dict(feature_map="relu"),
        dict(feature_map="learnable"),
        dict(feature_map="hedgehog", output_gate=True),
        dict(output_norm=False, rope=True),
        dict(feature_map="hedgehog", normalize=True, output_norm=False, output_gate=False, rope=True),  # LoLCATs
    ],
)
def test_linear_options_chunk_equals_naive(options):
    cfg = _cfg("linear", **options)
    ids, ctx = _ids(1), SingleDeviceContext(B, T, CU)
    out = _model(cfg, "chunk")(ids, _positions(), ctx)
    ref = _model(cfg, "naive")(ids, _positions(), ctx)
    assert torch.isfinite(out).all() and (out - ref).abs().max() < 1e-10


@pytest.mark.parametrize("name", MIXERS + ["hedgehog"])
def test_mixer_causality_and_document_probe(name):
    cfg = _cfg("linear", feature_map="hedgehog") if name == "hedgehog" else _cfg(name)
    torch.manual_seed(0)
    mixer = build_mixer(cfg.mixer_of(0), cfg, 0).double()
    for p in mixer.parameters():  # non-trivial weights (the model's init zeroes biases)
        torch.nn.init.normal_(p, std=0.3)
    cos, sin = Rotary(cfg.rope, cfg.hd).cos_sin(_positions(), torch.float64)
    ctx = SingleDeviceContext(B, T, CU)
    x = torch.randn(B, T, cfg.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    base = mixer(x, cos, sin, ctx)
    for b, t, doc_end in [(0, 0, 1), (0, 5, 12), (0, 12, 30), (0, 29, 30), (1, 3, 4), (1, 4, 37)]:
        x2 = x.clone()
        x2[b, t] += 1.0
        diff = (mixer(x2, cos, sin, ctx) - base).abs().amax(-1)  # [B, T]
        assert (diff[b, :t] < 1e-13).all(), f"token {t} leaks into the past"
        assert (diff[b, t:doc_end] > 1e-8).all(), f"token {t} does not reach its document"
        assert (diff[b, doc_end:] < 1e-13).all(), f"token {t} leaks into the next document"
        assert (diff[1 - b] < 1e-13).all(), "leaks across rows"


@pytest.mark.parametrize("name", ["linear", "gla"])
def test_model_causality_probe(name):
    model = _model(_cfg(name))
    ids = _ids(3)
    base = model(ids, _positions(), SingleDeviceContext(B, T, CU))
    ids2 = ids.clone()
    ids2[0, 20] = (ids2[0, 20] + 1) % 61
    diff = (model(ids2, _positions(), SingleDeviceContext(B, T, CU)) - base).abs().amax(-1)
    assert (diff[0, :20] < 1e-13).all() and (diff[0, 20:30] > 0).all()
    assert (diff[0, 30:] < 1e-13).all() and (diff[1] < 1e-13).all()


def test_context_protocol():
    """Mixers reach their core op only through ctx.run(kind, ...): a context that overrides
    run sees every call with the kind's options."""
    calls = []

    class Ctx(SingleDeviceContext):
        def run(self, kind, q, k, v, **kw):
            calls.append((kind, sorted(kw)))
            return super().run(kind, q, k, v, **kw)

    cfg = _cfg("simple_gla")
    mixer = build_mixer("simple_gla", cfg, 0)
    cos, sin = Rotary(cfg.rope, cfg.hd).cos_sin(_positions(), torch.float32)
    x = torch.randn(B, T, cfg.dim)
    out = mixer(x, cos, sin, Ctx(B, T, CU))
    assert calls == [("linear", ["chunk_size", "g", "gk", "impl", "scale"])]
    assert torch.allclose(out, mixer(x, cos, sin, SingleDeviceContext(B, T, CU)))
