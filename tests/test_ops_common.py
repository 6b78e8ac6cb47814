"""The small helpers every kernel and strategy shares (models/ops/common.py) and the one
description of the sharding layouts (parallel/sharding.py) that every view derives from."""

import math

import pytest
import torch

from models.ops.common import acc_dtype, merge_lse, no_autocast, run_starts
from parallel.cad_plan import owner_runs
from parallel.sharding import check_divisible, local_index, rank_chunks, rank_runs


def test_acc_dtype():
    assert acc_dtype(torch.zeros(1, dtype=torch.float64)) == torch.float64
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert acc_dtype(torch.zeros(1, dtype=dt)) == torch.float32


def test_no_autocast_keeps_fp32_matmuls():
    @no_autocast
    def mm(a, b):
        return a @ b

    a = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        assert mm(a, a).dtype == torch.float32
    assert mm.__name__ == "mm"


@pytest.mark.parametrize("lead", [(), (2,)])
def test_merge_lse_equals_softmax_over_the_union(lead):
    """Two disjoint key sets merged by log-sum-exp == softmax over all keys; a row that sees no
    key on either side stays 0 with lse -inf (never NaN); one empty side changes nothing."""
    g = torch.Generator().manual_seed(0)
    t, h, d, k1, k2 = 5, 3, 4, 6, 7
    s = torch.randn(*lead, h, t, k1 + k2, generator=g, dtype=torch.float64)
    v = torch.randn(*lead, h, k1 + k2, d, generator=g, dtype=torch.float64)
    s[..., 0, :] = -math.inf  # row 0 of head 0 sees nothing at all
    s[..., 1, 2, :k1] = -math.inf  # row 2 of head 1 sees only the second set

    def part(sl):
        lse = torch.logsumexp(s[..., sl], -1)  # [..., H, T]
        p = torch.exp(s[..., sl] - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
        return (p @ v[..., sl, :]).transpose(-2, -3), lse  # [..., T, H, D]

    o, lse = merge_lse(*part(slice(0, k1)), *part(slice(k1, None)))
    o_ref, lse_ref = part(slice(None))
    assert not o.isnan().any()
    assert torch.equal(lse.isinf(), lse_ref.isinf())
    assert (o - o_ref).abs().max() < 1e-12
    fin = ~lse_ref.isinf()
    assert (lse[fin] - lse_ref[fin]).abs().max() < 1e-12


def test_run_starts():
    pos = torch.tensor([0, 1, 2, 7, 8, 3, 4, 5])
    assert run_starts(pos).tolist() == [0, 3, 5]
    doc = torch.tensor([0, 0, 1, 1, 1, 1, 1, 2])
    assert run_starts(pos, doc).tolist() == [0, 2, 3, 5, 7]
    assert run_starts(pos[:0]).tolist() == []
    assert run_starts(pos[:1]).tolist() == [0]


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_layout_views_agree(cp, layout):
    """Every view of a layout derives from rank_chunks: the token index, the position ranges
    (CAD's owners), and they tile the row exactly once; zigzag rank r holds chunks r, 2P-1-r."""
    n = 24 * cp
    runs = rank_runs(n, cp, layout)
    seen = torch.cat([local_index(n, r, cp, layout) for r in range(cp)])
    assert sorted(seen.tolist()) == list(range(n))
    for r in range(cp):
        assert local_index(n, r, cp, layout).tolist() == [p for a, b in runs[r] for p in range(a, b)]
        if layout == "zigzag":
            assert rank_chunks(cp, layout)[r] == [r, 2 * cp - 1 - r]
            c = n // (2 * cp)
            assert runs[r] == [(r * c, (r + 1) * c), ((2 * cp - 1 - r) * c, (2 * cp - r) * c)]
    if cp > 1:
        assert owner_runs(n, cp, layout) == runs
    else:
        assert owner_runs(n, cp, layout) == [[(0, n)]]


def test_layout_errors_name_the_setting():
    with pytest.raises(ValueError, match="parallel.cp.layout='ring'"):
        rank_chunks(2, "ring")
    with pytest.raises(ValueError, match="data.seq_len to a multiple of 4"):
        rank_runs(10, 2, "zigzag")
    check_divisible(8, 2, "zigzag")
