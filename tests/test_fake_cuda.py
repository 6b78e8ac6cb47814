"""CUDA code paths on CPU with fake CUDA tensors (tests/fake_cuda.py): a CPU tensor meeting a
CUDA one fails here as it would on a GPU, and the numbers must match the CPU run."""

import warnings

import pytest
import torch

from models.ops.attention import MaskSpec, attention_backward, attention_forward, attention_ref, plan
from models.ops.documents import doc_ids
from tests.fake_cuda import DeviceMismatch, count_host_syncs, cpu, cuda, fake_cuda

warnings.filterwarnings("ignore", message=".*CUDA is not available.*")


def test_helper_rejects_what_cuda_rejects():
    with fake_cuda():
        x = torch.randn(4, 8, device="cuda")
        assert x.is_cuda and x.device == torch.device("cuda", 0)
        with pytest.raises(DeviceMismatch):
            x.masked_fill(torch.ones(8, dtype=torch.bool), 0.0)
        with pytest.raises(DeviceMismatch):
            x.index_add_(0, torch.tensor([0, 1]), x[:2])
        with pytest.raises(DeviceMismatch):
            x + torch.ones(8)
        # what CUDA accepts: CPU index tensors in indexing, 0-dim CPU scalars, copies
        assert x[torch.tensor([2, 0])].shape == (2, 8) and (x + torch.tensor(1.0)).is_cuda
        x[torch.tensor([1])] = torch.zeros(1, 8, device="cuda")
        assert x.cpu()[1].abs().sum() == 0 and not x.cpu().is_cuda
        with count_host_syncs() as n:
            bool(x.sum() > 0)
            x.tolist()
        assert n[0] == 2


def _inputs(b, t, h, hkv, d, cu, window=None, causal=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=g, dtype=dtype)
    k, v = (torch.randn(b, t, hkv, d, generator=g, dtype=dtype) for _ in range(2))
    pos = torch.arange(t)
    doc = doc_ids(cu, torch.arange(b)[:, None] * t + pos[None])
    return q, k, v, MaskSpec(pos, pos, doc, doc, causal, window)


def test_attention_ref_on_cuda():
    """Defect: attention_ref built its [B, 1, Tq, Tk] mask on CPU and masked CUDA scores with it."""
    q, k, v, mask = _inputs(2, 24, 4, 2, 8, torch.tensor([0, 5, 24, 30, 48]))
    ref = attention_ref(q, k, v, mask)
    with fake_cuda():
        out = attention_ref(cuda(q), cuda(k), cuda(v), mask)
    assert out[0].is_cuda and torch.allclose(cpu(out[0]), ref[0]) and torch.equal(cpu(out[1]), ref[1])


def _forward_backward(q, k, v, do, mask, block):
    o, lse = attention_forward(q, k, v, mask, None, block)
    return (o, lse, *attention_backward(do, q, k, v, o, lse, mask, None, block))


def _same_on_cuda(q, k, v, mask, block):
    do = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(1))
    want = _forward_backward(q, k, v, do, mask, block)
    with fake_cuda():
        got = _forward_backward(cuda(q), cuda(k), cuda(v), cuda(do), mask, block)
    for g, w in zip(got, want):
        assert g.is_cuda
        g = cpu(g)
        fin = torch.isfinite(w)
        assert torch.equal(fin, torch.isfinite(g)) and (g[fin] - w[fin]).abs().max() < 1e-10


@pytest.mark.parametrize("window", [None, 5])
def test_dense_span_plan_on_cuda(window):
    """The span plan's pieces (causal, full, band tiles with their masks) on a CUDA device."""
    q, k, v, mask = _inputs(2, 40, 4, 2, 8, torch.tensor([0, 7, 40, 41, 80]), window)
    _same_on_cuda(q, k, v, mask, block=8)


def test_generic_block_plan_on_cuda(monkeypatch):
    """Defect: the generic block plan (rows with more than MAX_PIECES run pairs) masked CUDA
    scores with a CPU mask and index_add_-ed CUDA gradients at CPU key indices."""
    monkeypatch.setattr(plan, "MAX_PIECES", 1)
    t = 32
    q, k, v, mask = _inputs(1, t, 2, 1, 8, torch.tensor([0, 9, 20, 32]))
    perm = torch.cat([torch.arange(0, t, 2), torch.arange(1, t, 2)])  # strided keys: gathered, not sliced
    mask = MaskSpec(mask.q_pos, mask.k_pos[perm], mask.q_doc, mask.k_doc[:, perm], True, None)
    assert plan.span_plan(mask, 0) is None
    _same_on_cuda(q, k[:, perm], v[:, perm], mask, block=8)
