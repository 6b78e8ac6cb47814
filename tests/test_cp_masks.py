"""Every softmax CP strategy under every mask family (``SliceMask``, models/ops/attention/slices.py)
against the dense fp64 reference on the whole row, at worlds 1-4 and both layouts; the bytes
each strategy receives against its formula for the mask; allgather gathering only the chunks
some slice needs, ring computing only the steps some slice touches, CAD costing shards by slice
area. The default tier runs a few builders per world (all of them across the worlds) and one
random slice set; ``-m slow`` runs every builder and several random sets at every world."""

import pytest
import torch
import torch.distributed as dist

from models.ops.attention import MaskSpec, attention_ref
from models.ops.attention import slices as S
from parallel import comm
from parallel.cad_plan import plan_cad
from parallel.context import CPContext
from parallel.mesh import build_subgroups
from parallel.strategies import LayerShape, build_strategy
from tests.cp_check import make_case, run_cp
from tests.test_mask_slices import builders, random_slices

pytestmark = pytest.mark.gloo


def strategies(world):
    """(name, options) of every softmax strategy at this world (USP with a real ring at 4)."""
    out = [("allgather", {}), ("ring", {}), ("ulysses", {}), ("cad", {"min_shard": 4})]
    out.append(("usp", {"ulysses_size": 2} if world == 4 else {}))
    return out


def heads_for(world):
    return 6 if world == 3 else 4  # whole heads per rank for Ulysses, an even count for S^2-Attn


def masks_for(world, full_matrix):
    n, h = 2 * max(world, 1) * 11, heads_for(world)  # 11 or 22 tokens per rank: no block divides it
    every = builders(n, h)
    if full_matrix:
        return n, [m for _, m in every] + [random_slices(s, n, h) for s in range(3)]
    picked = every[world % 4 :: 4]  # a quarter per world: every builder across worlds 1-4
    return n, [m for _, m in picked] + [random_slices(world, n, h)]


def check_masks(rank, world, name, options, n, h, masks):
    """Max error per (layout, mask) of o, dq, dk, dv on this rank's shard."""
    group = dist.group.WORLD if world > 1 else None
    strat = build_strategy(name, **options)
    sizes = strat.subgroup_sizes(world, h) if world > 1 else []
    subgroups = build_subgroups(group, world, sizes) if sizes else {}
    errs = []
    for layout in ("contiguous", "zigzag"):
        for i, mask in enumerate(masks):
            q, k, v, do, cu = make_case(i, 1, n, h, 2, 8, [n])
            pos = torch.arange(n)
            qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
            o_r, _ = attention_ref(qr, kr, vr, MaskSpec(pos, pos, slices=mask))
            (o_r * do).sum().backward()
            ref = (o_r.detach(), qr.grad, kr.grad, vr.grad)
            ctx = CPContext(strat, group, rank, world, layout, n, 1, cu, 16, subgroups)
            idx = ctx.local_index
            ql, kl, vl = (t[:, idx].clone().requires_grad_() for t in (q, k, v))
            o = ctx.run("softmax", ql, kl, vl, mask=mask)
            (o * do[:, idx]).sum().backward()
            got = (o.detach(), ql.grad, kl.grad, vl.grad)
            errs.append((layout, mask.name, max((g - r[:, idx]).abs().max().item() for g, r in zip(got, ref))))
    return errs


def check_masks_each(rank, world, cells, n, h, masks):
    """check_masks for every (name, options) of ``cells`` in one spawn (each costs seconds)."""
    return [check_masks(rank, world, name, options, n, h, masks) for name, options in cells]


def _run(world, full_matrix):
    n, masks = masks_for(world, full_matrix)
    cells = strategies(world) if world > 1 else [("local", {})]
    per_rank = run_cp(check_masks_each, world, cells, n, heads_for(world), masks)
    for (name, _), errs in zip(cells, zip(*per_rank)):
        bad = [e for rank in errs for e in rank if e[2] > 1e-10]
        assert len(errs) == world and all(len(r) == 2 * len(masks) for r in errs)
        assert not bad, (name, bad)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_masks_exact_under_every_strategy(world):
    _run(world, full_matrix=False)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_builder_exact_under_every_strategy(world):
    _run(world, full_matrix=True)


# ----------------------------------------------------------------------------- bytes and work
B, N, H, HKV, D = 1, 64, 4, 2, 4  # fp32, world 4: C = 16 tokens per rank
CHUNK = 2 * B * (N // 4) * HKV * D * 4  # K and V of one rank


def _bytes(rank, world, layout, name, options, mask):
    """(bytes received in one forward, the strategy's formula for it, ring's computed steps)."""
    q, k, v, _, cu = make_case(0, B, N, H, HKV, D, [N], torch.float32)
    strat = build_strategy(name, **options)
    group = dist.group.WORLD
    sizes = strat.subgroup_sizes(world, H)
    subgroups = build_subgroups(group, world, sizes) if sizes else {}
    ctx = CPContext(strat, group, rank, world, layout, N, B, cu, 16, subgroups)
    idx = ctx.local_index
    shape = LayerShape(batch=B, seq_len=N, cp=world, n_heads=H, n_kv_heads=HKV, head_dim=D, layout=layout)
    if name == "allgather":
        formula = strat.needed_bytes(ctx, shape, mask)
    elif name == "cad":
        formula = strat.plan_bytes(ctx, H, HKV, D, 4, mask=mask)
    else:
        formula = strat.forward_bytes(shape)
    steps = strat.computed_steps(ctx, mask) if name == "ring" else None
    comm.COUNTER.reset()
    ctx.run("softmax", q[:, idx], k[:, idx], v[:, idx], mask=mask)
    return comm.COUNTER.total_received, formula, steps


BYTE_MASKS = [S.causal_blockwise(N, 16), S.sliding_window(N, 5), S.prefix_lm(N, 24), S.shared_question(8, [20, 36])]


BYTE_STRATEGIES = [
    ("allgather", {}),
    ("ring", {}),
    ("ulysses", {}),
    ("usp", {"ulysses_size": 2}),
    ("cad", {"min_shard": 4}),
]


def _bytes_every_mask(rank, world, name, options):
    """``_bytes`` for every BYTE_MASKS mask and both layouts, in one spawn (each costs seconds)."""
    return [
        (mask.name, layout, *_bytes(rank, world, layout, name, options, mask)[:2])
        for mask in BYTE_MASKS
        for layout in ("contiguous", "zigzag")
    ]


@pytest.mark.parametrize("name,options", BYTE_STRATEGIES)
def test_bytes_equal_the_formula_for_every_mask(name, options):
    for rows in run_cp(_bytes_every_mask, 4, name, options):
        assert len(rows) == 2 * len(BYTE_MASKS)
        for mask, layout, got, formula in rows:
            assert got == formula, (name, mask, layout, got, formula)


def test_allgather_gathers_only_needed_chunks_and_ring_skips_untouched_steps():
    """Contiguous layout, 16-token blocks = one rank each: under causal_blockwise rank r needs
    only chunk 0 (the first block) besides its own, so it receives one chunk (rank 0 none) and
    its ring computes steps 0 and r only; a 5-token window needs only the previous rank."""
    cbw, win = S.causal_blockwise(N, 16), S.sliding_window(N, 5)
    cells = [("allgather", cbw), ("allgather", win), ("ring", cbw), ("ring", win)]
    ag_cbw, ag_win, ring_cbw, ring_win = zip(*run_cp(_bytes_cells, 4, cells))  # per cell, per rank
    assert [g for g, _, _ in ag_cbw] == [0, CHUNK, CHUNK, CHUNK]
    assert [g for g, _, _ in ag_win] == [0, CHUNK, CHUNK, CHUNK]
    assert [s for _, _, s in ring_cbw] == [[0], [0, 1], [0, 2], [0, 3]]
    assert [s for _, _, s in ring_win] == [[0], [0, 1], [0, 1], [0, 1]]


def _bytes_cells(rank, world, cells):
    """``_bytes`` (contiguous layout) for each (strategy, mask) of ``cells`` in one spawn."""
    return [_bytes(rank, world, "contiguous", name, {}, mask) for name, mask in cells]


def _dense_load(plan, mask, h):
    """Per rank: the (head, query, key) pairs the mask allows for the queries the plan puts there."""
    n = plan.seq_len
    allowed = S.dense(mask.row(0), torch.arange(n), torch.arange(n), h).sum(0).sum(-1)  # [N] pairs per query
    load = [0] * plan.world
    for s in plan.shards:
        load[s.rank] += int(allowed[s.lo : s.hi].sum())
    return load


@pytest.mark.parametrize(
    "mask",
    [
        S.causal_blockwise(1024, 128),
        S.prefix_lm(1024, 300),
        S.shared_question(200, [300, 250, 274]),
        S.block_causal(1024, 100),
        S.longlora(1024, 96, 4),
        S.global_sliding_window(1024, 4, 64),
        S.varlen_sliding_window([100, 524, 400], 48),
    ],
    ids=lambda m: m.name,
)
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_cad_costs_shards_by_slice_area(mask, layout):
    """The planner's loads are the exact allowed pairs of the queries it places (not the
    slices' bounding boxes), and it balances these masks to <= 1.1."""
    plan = plan_cad(
        None, 1, 1024, 4, layout, min_shard=16, tolerance=1.1, qrow_bytes=4, kvrow_bytes=4, mask=mask, n_heads=4
    )
    assert plan.load == _dense_load(plan, mask, 4)
    assert plan.balance() <= 1.1, (plan.home_balance(), plan.balance())


def test_mask_errors_name_the_setting():
    ctx = CPContext(build_strategy("ring"), None, 0, 1, "zigzag", 16, 1, torch.tensor([0, 16]), 16)
    q = torch.zeros(1, 16, 4, 8)
    with pytest.raises(ValueError, match="cannot be combined with model.mask"):
        ctx.run("softmax", q, q, q, window=4, mask=S.causal(16))
    with pytest.raises(ValueError, match="covers rows of 12 tokens but the batch rows hold 16"):
        ctx.run("softmax", q, q, q, mask=S.causal(12))
    with pytest.raises(ValueError, match="names a head outside 0..3"):
        ctx.run("softmax", q, q, q, mask=S.longlora(16, 4, 8))
