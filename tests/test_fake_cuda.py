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


# ----------------------------------------------------------------------------- flash-attn dispatch
@pytest.mark.parametrize(
    "d,capability,dtype,ok",
    [
        (64, (9, 0), torch.bfloat16, True),
        (256, (8, 0), torch.float16, True),
        (512, (9, 0), torch.bfloat16, False),  # head dim > 256: PyTorch path, not a flash-attn error
        (60, (9, 0), torch.bfloat16, False),  # not a multiple of 8
        (64, (7, 5), torch.bfloat16, False),  # Turing: no flash-attn 2
        (64, (9, 0), torch.float32, False),
    ],
)
def test_flash_dispatch_checks_head_dim_and_capability(d, capability, dtype, ok, monkeypatch):
    from models.ops import flash

    monkeypatch.setattr(flash, "_capability", lambda index: capability, raising=False)
    _, _, _, mask = _inputs(1, 16, 2, 2, 8, torch.tensor([0, 16]))
    with fake_cuda():
        q = torch.zeros(1, 16, 2, d, device="cuda", dtype=dtype)
        assert flash.applicable(q, mask) is ok


def test_flash_varlen_call_reads_nothing_back(monkeypatch):
    """cu_seqlens and max_seqlen come from the mask's host-side document ids: no device nonzero
    and no int() of a device max per layer."""
    import sys
    import types

    from models.ops import flash

    seen = {}

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        seen.update(cu=cu_q, max=max_q)
        return q.clone(), torch.zeros(q.shape[1], q.shape[0], device=q.device), None

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=varlen))
    q, k, v, mask = _inputs(2, 16, 2, 2, 8, torch.tensor([0, 5, 16, 20, 32]))
    with fake_cuda(), count_host_syncs() as reads:
        out, lse = flash.flash_attention(cuda(q.bfloat16()), cuda(k.bfloat16()), cuda(v.bfloat16()), mask, 0.3)
    assert reads[0] == 0 and out.is_cuda and seen["cu"].is_cuda and seen["max"] == 12
    assert cpu(seen["cu"]).tolist() == [0, 5, 16, 20, 32]


# ----------------------------------------------------------------------------- linear attention
def _linear_inputs(b, t, h, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, t, h, d, generator=g, dtype=torch.float64) for _ in range(3))
    gate = -torch.rand(b, t, h, generator=g, dtype=torch.float64)
    return q, k, v, gate


@pytest.mark.parametrize("gated", [False, True])
def test_chunk_linear_attention_on_cuda_without_host_syncs(gated):
    """The chunk op on a CUDA device: same numbers, and the flags its Python control flow reads
    (any reset, which chunks carry their state) come from the host-side cu_seqlens."""
    from models.ops.linear_attention import chunk_linear_attention

    q, k, v, gate = _linear_inputs(2, 40, 2, 4)
    g = gate if gated else None
    cu = torch.tensor([0, 7, 40, 55, 80])
    want, s_want = chunk_linear_attention(q, k, v, g, scale=0.5, cu_seqlens=cu, chunk_size=8, output_final_state=True)
    with fake_cuda(), count_host_syncs() as reads:
        got, s_got = chunk_linear_attention(
            cuda(q), cuda(k), cuda(v), None if g is None else cuda(g), scale=0.5, cu_seqlens=cu, chunk_size=8,
            output_final_state=True, impl="chunk",
        )  # fmt: skip
    assert reads[0] == 0
    assert (cpu(got) - want).abs().max() < 1e-12 and (cpu(s_got) - s_want).abs().max() < 1e-12


def test_lasp_intra_op_builds_cu_seqlens_on_the_host():
    from parallel.strategies.lasp_common import intra_linear_attention

    q, k, v, _ = _linear_inputs(1, 32, 2, 4)
    resets = torch.zeros(1, 32, dtype=torch.bool)
    resets[0, [9, 20]] = True
    want = intra_linear_attention(q, k, v, None, None, 0.5, resets, 8, "chunk")
    with fake_cuda(), count_host_syncs() as reads:
        got = intra_linear_attention(cuda(q), cuda(k), cuda(v), None, None, 0.5, resets, 8, "chunk")
    assert reads[0] == 0 and (cpu(got) - want).abs().max() < 1e-12


def test_cad_routes_move_to_the_device_once_per_plan():
    """CAD's index tensors go to the GPU once per plan, not in every layer's call."""
    from parallel.strategies import build_strategy

    strat = build_strategy("cad")
    moved = []

    class R:
        def to(self, device):
            moved.append(device)
            return self

    routes = [R(), R()]
    first = strat._routes_on(routes, torch.device("cuda", 0))
    assert strat._routes_on(routes, torch.device("cuda", 0)) is first and len(moved) == 2


def test_flash_dispatch_leaves_slice_masks_to_the_pytorch_path(monkeypatch):
    """A mask given as slices (here prefix-LM) is not flash-attn's varlen mask: never dispatched."""
    from models.ops import flash
    from models.ops.attention.plan import MaskSpec
    from models.ops.attention.slices import prefix_lm

    monkeypatch.setattr(flash, "_capability", lambda index: (9, 0), raising=False)
    pos = torch.arange(16)
    mask = MaskSpec(pos, pos, slices=prefix_lm(16, 5))
    with fake_cuda():
        q = torch.zeros(1, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
        assert flash.applicable(q, mask) is False
