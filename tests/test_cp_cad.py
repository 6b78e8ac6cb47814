"""Core attention disaggregation (cad) vs the single-device reference (fp64, 1e-10: o, dq,
dk, dv) at world sizes 1-4, both layouts, with and without ping-pong; its bytes against the
plan's count; the plan identical on every rank. One spawn per world size (spawns cost seconds).
"""

import pytest
import torch
import torch.distributed as dist

from parallel import comm
from parallel.context import CPContext
from parallel.strategies import build_strategy
from tests.cp_check import cases_for, check_strategy, make_case, run_cp

pytestmark = pytest.mark.gloo  # spawns multi-process gloo groups

COMBOS = {  # world -> (layout, ping_pong) combinations run in its one spawn
    1: [("contiguous", False)],
    2: [("contiguous", False), ("zigzag", True)],
    3: [("zigzag", False), ("contiguous", True)],
    4: [("contiguous", False), ("zigzag", False), ("contiguous", True), ("zigzag", True)],
}


def _bytes_and_plan(rank, world, ping_pong):
    """Measured bytes of one forward on a skewed mix == the plan's count; the plan's shards."""
    b, n, h, hkv, d = 2, 32 * world, 4, 2, 8
    q, k, v, _, cu = make_case(3, b, n, h, hkv, d, [n // 2 + 3, 5, 1, n // 4], torch.float32)
    strat = build_strategy("cad", min_shard=4, ping_pong=ping_pong)
    ctx = CPContext(strat, dist.group.WORLD, rank, world, "zigzag", n, b, cu, 16)
    idx = ctx.local_index
    comm.COUNTER.reset()
    ctx.attention(q[:, idx], k[:, idx], v[:, idx], causal=True, window=None)
    measured = comm.COUNTER.total_received
    return measured, strat.plan_bytes(ctx, h, hkv, d, 4), strat.plan(ctx, True, None, h, 2 * hkv).shards


def _long_cases(world):
    """Rows long enough that a shard's keys span several kernel key chunks (4 * block = 64)."""
    n = 2 * world * 20
    base = dict(b=1, n=n, h=4, hkv=2, d=8)
    return [
        dict(base, seed=8, doc_lens=[n // 2 + 7, 3, n], causal=True, window=None),
        dict(base, seed=9, doc_lens=[n], causal=False, window=70),
    ]


def _run(rank, world):
    errs = []
    for layout, ping_pong in COMBOS[world]:
        opts = {"min_shard": 4, "ping_pong": ping_pong}
        errs += check_strategy(rank, world, "cad", layout, cases_for(world) + _long_cases(world), 16, opts)
    return errs, (_bytes_and_plan(rank, world, True) if world > 1 else None)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_cad_exact_and_bytes(world):
    out = run_cp(_run, world)
    worst = max(max(errs) for errs, _ in out)
    assert worst < 1e-10, [errs for errs, _ in out]
    if world > 1:
        for measured, planned, shards in (b for _, b in out):
            assert measured == planned
            assert shards == out[0][1][2]  # every rank computed the same plan
        assert max(m for _, (m, _, _) in out) > 0
