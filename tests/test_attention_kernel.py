"""The block-sparse LSE attention kernel against the dense reference (fp64)."""

import pytest
import torch
import torch.nn.functional as F

from models.ops.attention import MaskSpec, active_blocks, attention, attention_ref
from models.ops.common import merge_lse
from models.ops.documents import doc_ids


def _case(b, tq, tk, h, hkv, d, q_pos, k_pos, cu, causal, window, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, tq, h, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, tk, hkv, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, tk, hkv, d, generator=g, dtype=torch.float64, requires_grad=True)
    n = int(max(q_pos.max(), k_pos.max())) + 1
    rows = torch.arange(b)[:, None] * n
    mask = MaskSpec(q_pos, k_pos, doc_ids(cu, rows + q_pos), doc_ids(cu, rows + k_pos), causal, window)
    return q, k, v, mask


def _compare(q, k, v, mask, block):
    do = torch.randn(q.shape, dtype=q.dtype)
    o, lse = attention(q, k, v, mask, None, block)
    grads = torch.autograd.grad((o * do).sum(), (q, k, v))
    o_r, lse_r = attention_ref(q, k, v, mask)
    grads_r = torch.autograd.grad((o_r * do).sum(), (q, k, v))
    assert torch.isfinite(o).all() and all(torch.isfinite(g).all() for g in grads)
    assert (o - o_r).abs().max() < 1e-10
    fin = torch.isfinite(lse_r)
    assert torch.equal(fin, torch.isfinite(lse))
    assert (lse[fin] - lse_r[fin]).abs().max() < 1e-10
    for g, gr in zip(grads, grads_r):
        assert (g - gr).abs().max() < 1e-10


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 1, 7, 40])
@pytest.mark.parametrize("h,hkv", [(4, 4), (4, 2), (4, 1)])
def test_kernel_matches_reference(causal, window, h, hkv):
    n = 45  # not a multiple of the block
    pos = torch.arange(n)
    cu = torch.tensor([0, 1, 13, 30, 45, 46, 60, 90])  # 2 rows, docs of length 1, crossing nothing
    q, k, v, mask = _case(2, n, n, h, hkv, 8, pos, pos, cu, causal, window)
    _compare(q, k, v, mask, block=8)


def test_offset_chunks_and_empty_rows():
    """A Q chunk meeting a K chunk from elsewhere; queries before all keys see nothing."""
    q_pos = torch.cat([torch.arange(10, 20), torch.arange(50, 60)])  # zigzag-like pair of chunks
    k_pos = torch.arange(15, 35)
    cu = torch.tensor([0, 25, 64])
    q, k, v, mask = _case(1, 20, 20, 2, 1, 4, q_pos, k_pos, cu, True, None)
    _compare(q, k, v, mask, block=4)
    o, lse = attention(q, k, v, mask, None, 4)
    assert torch.isinf(lse[0, :, :5]).all() and (o[0, :5] == 0).all()  # positions 10..14


def test_empty_blocks_are_skipped():
    n, block = 64, 8
    pos = torch.arange(n)
    cu = torch.tensor([0, 16, 32, 48, 64])
    _, _, _, mask = _case(1, n, n, 1, 1, 4, pos, pos, cu, True, None)
    plan = active_blocks(mask, block, block)
    computed = sum(len(kidx) // block for kidx in plan[0])
    assert computed == 4 * 3  # 4 docs of 2 blocks: 3 causal blocks each, out of 64
    causal_only = active_blocks(MaskSpec(pos, pos, mask.q_doc * 0, mask.k_doc * 0, True, None), block, block)
    assert sum(len(kidx) // block for kidx in causal_only[0]) == 8 * 9 // 2


def test_fp32_close_to_fp64():
    n = 33
    pos = torch.arange(n)
    q, k, v, mask = _case(1, n, n, 2, 2, 16, pos, pos, torch.tensor([0, n]), True, None)
    o64, _ = attention(q, k, v, mask, None, 8)
    o32, _ = attention(q.float(), k.float(), v.float(), mask, None, 8)
    assert o32.dtype == torch.float32 and (o32.double() - o64).abs().max() < 1e-5


# ----------------------------------------------------------------------------- dispatch paths
from models.ops.attention import attention_backward, attention_forward, planned_pairs, span_plan  # noqa: E402
from models.ops.attention import fused as attn_fused  # noqa: E402
from models.ops.attention import plan as attn_plan  # noqa: E402


def _forms(mask, b=0):
    return [p.form for p in span_plan(mask, b)]


@pytest.mark.parametrize("hkv", [4, 2])
@pytest.mark.parametrize("n", [45, 100])
def test_dense_causal_is_one_fused_piece(n, hkv):
    pos = torch.arange(n)
    q, k, v, mask = _case(1, n, n, 4, hkv, 8, pos, pos, torch.tensor([0, n]), True, None)
    assert _forms(mask) == ["causal"]
    _compare(q, k, v, mask, block=16)  # n not a multiple of the block


@pytest.mark.parametrize("hkv", [4, 1])
def test_packed_documents_one_piece_per_document(hkv):
    n = 100
    pos = torch.arange(n)
    cu = torch.tensor([0, 7, 23, 24, 61, 100, 117, 150, 200])  # crosses every 16-block edge
    q, k, v, mask = _case(2, n, n, 4, hkv, 8, pos, pos, cu, True, None)
    assert _forms(mask, 0) == ["causal"] * 5 and _forms(mask, 1) == ["causal"] * 3
    docs = torch.diff(cu).tolist()
    assert planned_pairs(mask) == sum(t * (t + 1) // 2 for t in docs)  # exactly the allowed pairs
    _compare(q, k, v, mask, block=16)


def test_off_diagonal_chunk_pieces():
    """A ring step: keys partly before, partly inside the query run -> a full and a causal piece."""
    q_pos, k_pos = torch.arange(20, 40), torch.arange(10, 30)
    q, k, v, mask = _case(1, 20, 20, 2, 2, 8, q_pos, k_pos, torch.tensor([0, 64]), True, None)
    assert _forms(mask) == ["full", "causal"]
    _compare(q, k, v, mask, block=8)


@pytest.mark.parametrize("causal", [True, False])
def test_window_runs_as_band_tiles(causal):
    n = 77
    pos = torch.arange(n)
    q, k, v, mask = _case(1, n, n, 4, 2, 8, pos, pos, torch.tensor([0, 30, 77]), causal, 9)
    assert set(_forms(mask)) == {"band"}
    _compare(q, k, v, mask, block=8)


@pytest.mark.parametrize("causal", [True, False])
def test_generic_block_plan_for_scattered_positions(causal, monkeypatch):
    """Positions in no order: too many runs for the span plan, the fixed-block plan takes over."""
    monkeypatch.setattr(attn_plan, "MAX_PIECES", 8)
    g = torch.Generator().manual_seed(3)
    q_pos, k_pos = torch.randperm(40, generator=g), torch.randperm(40, generator=g)
    q, k, v, mask = _case(1, 40, 40, 4, 2, 8, q_pos, k_pos, torch.tensor([0, 17, 40]), causal, None)
    assert span_plan(mask, 0) is None
    _compare(q, k, v, mask, block=8)


@pytest.mark.parametrize("window", [None, 12])
@pytest.mark.parametrize("hkv", [4, 2])
def test_fp32_dispatch_close_to_reference(window, hkv):
    n = 70
    pos = torch.arange(n)
    q, k, v, mask = _case(1, n, n, 4, hkv, 16, pos, pos, torch.tensor([0, 33, n]), True, window)
    do = torch.randn(q.shape, dtype=q.dtype)
    o_r, lse_r = attention_ref(q, k, v, mask)
    grads_r = torch.autograd.grad((o_r * do).sum(), (q, k, v))
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    o, lse = attention(q32, k32, v32, mask, None, 16)
    grads = torch.autograd.grad((o * do.float()).sum(), (q32, k32, v32))
    assert o.dtype == lse.dtype == torch.float32
    assert (o.double() - o_r).abs().max() < 1e-5 and (lse.double() - lse_r).abs().max() < 1e-5
    for g_, gr in zip(grads, grads_r):
        assert (g_.double() - gr).abs().max() < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("window", [None, 10])
def test_merged_lse_backward_per_key_chunk(dtype, tol, window):
    """Ring style: split K/V in two chunks, merge the two forwards by log-sum-exp, run the
    backward of each chunk with the *merged* o / lse: dq sums, dk / dv concatenate to the
    full backward. Zigzag queries: some rows see nothing in one chunk."""
    n = 48
    q_pos = torch.cat([torch.arange(0, 12), torch.arange(36, 48)])
    k_pos = torch.arange(n)
    cu = torch.tensor([0, 5, 30, n])
    q, k, v, mask = _case(1, 24, n, 4, 2, 8, q_pos, k_pos, cu, True, window)
    do = torch.randn(q.shape, dtype=torch.float64)
    o_r, _ = attention_ref(q, k, v, mask)
    ref = torch.autograd.grad((o_r * do).sum(), (q, k, v))
    q, k, v, do = (x.detach().to(dtype) for x in (q, k, v, do))
    halves = [slice(0, n // 2), slice(n // 2, n)]
    masks = [MaskSpec(q_pos, k_pos[s], mask.q_doc, mask.k_doc[:, s], True, window) for s in halves]
    outs = [attention_forward(q, k[:, s], v[:, s], m, None, 8) for s, m in zip(halves, masks)]
    o, lse = merge_lse(*outs[0], *outs[1])
    assert (o.double() - o_r).abs().max() < tol
    dq = torch.zeros_like(q)
    dk, dv = [], []
    for s, m in zip(halves, masks):
        gq, gk, gv = attention_backward(do, q, k[:, s], v[:, s], o, lse, m, None, 8)
        dq += gq
        dk.append(gk)
        dv.append(gv)
    for got, want in zip((dq, torch.cat(dk, 1), torch.cat(dv, 1)), ref):
        assert got.dtype == dtype and (got.double() - want).abs().max() < tol


@pytest.mark.parametrize("window", [None, 9])
def test_tile_loop_for_every_piece(window, monkeypatch):
    """Without the fused CPU op (other devices), full and causal pieces run the tile loop."""
    monkeypatch.setattr(attn_fused, "_FLASH_CPU", None)
    q_pos = torch.cat([torch.arange(0, 20), torch.arange(60, 80)])
    k_pos = torch.arange(80)
    q, k, v, mask = _case(2, 40, 80, 4, 2, 8, q_pos, k_pos, torch.tensor([0, 13, 70, 80, 160]), True, window)
    _compare(q, k, v, mask, block=8)


@pytest.mark.parametrize("cu", [torch.tensor([0, 64, 128]), torch.tensor([0, 20, 64, 100, 128])])
def test_bf16_runs_the_fused_op_as_sdpa_does(cu, monkeypatch):
    """bf16 q, k, v (what the model hands over under autocast) go to the fused op without fp32
    copies, whole rows and packed documents alike; their error against fp64 is SDPA's in bf16."""
    pos = torch.arange(64)
    q, k, v, mask = _case(2, 64, 64, 4, 2, 16, pos, pos, cu, True, None)
    do = torch.randn(q.shape, dtype=torch.float64)
    o_r, _ = attention_ref(q, k, v, mask)
    ref = [o_r] + list(torch.autograd.grad((o_r * do).sum(), (q, k, v)))
    seen = []
    real = attn_fused._FLASH_CPU
    monkeypatch.setattr(attn_fused, "_FLASH_CPU", lambda q, *a, **kw: seen.append(q.dtype) or real(q, *a, **kw))
    half = [x.detach().bfloat16().requires_grad_() for x in (q, k, v)]
    o, _ = attention(*half, mask)
    got = [o] + list(torch.autograd.grad((o * do.bfloat16()).sum(), half))
    assert seen and set(seen) == {torch.bfloat16} and all(g.dtype == torch.bfloat16 for g in got)
    sdpa = [x.detach().bfloat16().requires_grad_() for x in (q, k, v)]
    docs = [(s, e) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
    outs = []
    for s, e in docs:  # SDPA on each document alone, as Hugging Face would run them
        b, r = divmod(s, 64)
        sl = slice(r, r + e - s)
        qd, kd, vd = (x[b, sl].transpose(0, 1)[None] for x in sdpa)
        outs.append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)[0].transpose(0, 1))
    o_s = torch.cat(outs).view(2, 64, 4, 16)
    want = [o_s] + list(torch.autograd.grad((o_s * do.bfloat16()).sum(), sdpa))
    for a, b, r in zip(got, want, ref):
        assert (a.double() - r).abs().max() <= 2 * (b.double() - r).abs().max() + 1e-2


def test_autocast_hands_the_kernel_bf16_q_k_v():
    """Under bf16 autocast RoPE (cos/sin follow the fp32 residual stream) must not promote q and
    k back to fp32: flash-attn (CUDA) and the fused CPU op only see half precision otherwise.
    Layouts: k, v heads-first in memory (the fused op reads them fastest), q token-major (the
    output follows it and reaches o_proj without a copy)."""
    from models import ModelConfig
    from models.context import SingleDeviceContext
    from models.rope import Rotary
    from models.softmax_attention import SoftmaxAttention

    cfg = ModelConfig(dim=32, n_heads=4, n_kv_heads=2)
    mixer = SoftmaxAttention(cfg, 0)
    x = torch.randn(1, 16, 32)
    cos, sin = Rotary(cfg.rope, cfg.hd).cos_sin(torch.arange(16)[None], x.dtype)

    class Recording(SingleDeviceContext):
        def run(self, kind, q, k, v, **options):
            self.dtypes = (q.dtype, k.dtype, v.dtype)
            self.layouts = (q.is_contiguous(), k.transpose(1, 2).is_contiguous(), v.transpose(1, 2).is_contiguous())
            return super().run(kind, q, k, v, **options)

    ctx = Recording(1, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixer(x, cos, sin, ctx)
    assert ctx.dtypes == (torch.bfloat16,) * 3
    assert ctx.layouts == (True, True, True)
