"""USP (ulysses x ring) context parallelism vs the single-device reference (fp64, 1e-10),
and, for ring, ulysses and usp, the bytes one forward receives against ``forward_bytes``."""

import pytest
import torch

from parallel.spawn import run_distributed
from tests.cp_check import cases_for, check_strategy, make_case, reference

pytestmark = pytest.mark.gloo  # spawns multi-process gloo groups

# (strategy, ulysses degree or None, n_heads, n_kv_heads) per world size
BYTE_CASES = {
    2: [("ring", None, 4, 2), ("ulysses", None, 6, 1), ("usp", 1, 4, 2), ("usp", 2, 4, 1)],
    4: [
        ("ring", None, 4, 2),
        ("ulysses", None, 4, 1),
        ("ulysses", None, 8, 4),
        ("usp", 2, 4, 1),
        ("usp", 2, 8, 8),
        ("usp", 1, 4, 2),
        ("usp", None, 4, 4),
    ],
}


def measure_bytes(rank, world, layout):
    """Per case: (..., bytes received in one forward, the strategy's forward_bytes)."""
    import torch.distributed as dist

    from parallel import comm
    from parallel.context import CPContext
    from parallel.mesh import build_subgroups
    from parallel.strategies import LayerShape, build_strategy

    out = []
    b, n, d = 2, 8 * world, 4
    for name, u, h, hkv in BYTE_CASES[world]:
        strat = build_strategy(name, **({} if u is None else {"ulysses_size": u}))
        q, k, v, _, cu = make_case(0, b, n, h, hkv, d, [5, n], dtype=torch.float32)
        subgroups = build_subgroups(dist.group.WORLD, world, strat.subgroup_sizes(world, h))
        ctx = CPContext(strat, dist.group.WORLD, rank, world, layout, n, b, cu, 8, subgroups)
        idx = ctx.local_index
        comm.COUNTER.reset()
        strat.attention(q[:, idx], k[:, idx], v[:, idx], ctx, causal=True)
        want = strat.forward_bytes(
            LayerShape(batch=b, seq_len=n, cp=world, n_heads=h, n_kv_heads=hkv, head_dim=d, elem_bytes=4)
        )
        out.append((name, u, h, hkv, comm.COUNTER.total_received, want))
    return out


def check_usp(rank, world, degrees, cases):
    """Every ulysses degree u (cp = u x cp/u) and both layouts, then the byte counts, in
    one spawn (each spawn costs seconds)."""
    errs = [
        e
        for u in degrees
        for layout in ("contiguous", "zigzag")
        for e in check_strategy(rank, world, "usp", layout, cases, options={"ulysses_size": u})
    ]
    return errs, measure_bytes(rank, world, "zigzag" if world == 4 else "contiguous")


@pytest.mark.parametrize("world,degrees", [(2, (1, 2)), (4, (2, 1, 4))])
def test_usp_exact_and_forward_bytes(world, degrees):
    out = run_distributed(check_usp, world, degrees, cases_for(world))
    worst = max(max(errs) for errs, _ in out)
    assert worst < 1e-10, out
    for _, per_rank in out:
        for name, u, h, hkv, got, want in per_rank:
            assert got == want > 0, (name, u, h, hkv, got, want)


def check_usp_dp2(rank, world):
    """dp=2 x cp=4 (2x2): both CP groups build their sub-groups at the same time."""
    import torch.distributed as dist

    from parallel.context import CPContext
    from parallel.mesh import build_subgroups
    from parallel.strategies.usp import USP

    groups = [dist.new_group(list(range(i, i + 4))) for i in (0, 4)]
    group, cp_rank = groups[rank // 4], rank % 4
    c = cases_for(4)[1]
    q, k, v, do, cu = make_case(c["seed"] + rank // 4, c["b"], c["n"], c["h"], c["hkv"], c["d"], c["doc_lens"])
    ref = reference(q, k, v, do, cu, c["causal"], c["window"])
    subgroups = build_subgroups(group, 4, [2])
    ctx = CPContext(USP(ulysses_size=2), group, cp_rank, 4, "zigzag", c["n"], c["b"], cu, 16, subgroups)
    idx = ctx.local_index
    ql, kl, vl = (t[:, idx].clone().requires_grad_() for t in (q, k, v))
    o = ctx.attention(ql, kl, vl, causal=c["causal"], window=c["window"])
    (o * do[:, idx]).sum().backward()
    got = (o.detach(), ql.grad, kl.grad, vl.grad)
    return max((g - r[:, idx]).abs().max().item() for g, r in zip(got, ref))


def test_usp_with_data_parallel_groups():
    errs = run_distributed(check_usp_dp2, 8)
    assert max(errs) < 1e-10, errs


def test_usp_config_errors():
    from parallel.strategies.usp import USP

    with pytest.raises(ValueError, match="parallel.cp.ulysses_size=3 does not divide parallel.cp.size=4"):
        USP(ulysses_size=3).check(n_heads=6, n_kv_heads=2, cp=4, seq_len=64, layout="zigzag")
    with pytest.raises(ValueError, match="model.n_heads=6 is not divisible by parallel.cp.ulysses_size=4"):
        USP(ulysses_size=4).check(n_heads=6, n_kv_heads=2, cp=4, seq_len=64, layout="zigzag")
    assert USP().degree(4, 6) == 2 and USP().degree(4, 8) == 4 and USP(ulysses_size=1).degree(4, 8) == 1
