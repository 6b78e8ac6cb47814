"""The block-sparse LSE attention kernel against the dense reference (fp64)."""

import pytest
import torch

from models.ops.attention import MaskSpec, active_blocks, attention, attention_ref
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
