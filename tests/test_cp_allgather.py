"""All-gather KV context parallelism vs the single-device reference (fp64, 1e-10), in both
exchange modes, with and without re-gathering K/V in backward; its bytes against the formulas;
the activations it keeps for backward falling as 1/P."""

import pytest
import torch
import torch.distributed as dist

from bench.runner import saved_storage_bytes
from parallel import comm
from parallel.context import CPContext
from parallel.spawn import run_distributed
from parallel.strategies import LayerShape, build_strategy
from tests.cp_check import check_strategy, make_case
from tests.test_cp_s2 import s2_cases

pytestmark = pytest.mark.gloo  # spawns multi-process gloo groups


def cases_for(world):
    n = 2 * world * 7  # 14 tokens per rank: not a multiple of the kernel block
    base = dict(b=2, n=n, d=8)
    return [
        dict(base, seed=1, h=4, hkv=4, doc_lens=[n], causal=True, window=None),
        dict(base, seed=2, h=4, hkv=2, doc_lens=[1, 5, 2 * n // 3, 1, 9], causal=True, window=None),
        dict(base, seed=3, h=4, hkv=1, doc_lens=[3, n // 2 + 5], causal=True, window=5),
        dict(base, seed=4, h=2, hkv=1, doc_lens=[7, 1, n], causal=True, window=n // world + 3),
        dict(base, seed=5, h=4, hkv=2, doc_lens=[n // 3, 2], causal=False, window=None),
        dict(base, seed=6, h=4, hkv=2, doc_lens=[5, 1, 1, 2, 7], causal=True, window=3),
    ]


def check_both(rank, world, layout, cases, gather):
    """Errors of regather on and off, in one spawn (each spawn costs seconds)."""
    return [
        e
        for regather in (True, False)
        for e in check_strategy(rank, world, "allgather", layout, cases, 16, {"gather": gather, "regather": regather})
    ]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("gather", ["needed", "all"])
def test_allgather_exact(world, layout, gather):
    if world == 1 and gather == "all":
        pytest.skip("same code path as gather=needed at world 1")
    errs = run_distributed(check_both, world, layout, cases_for(world), gather)
    worst = max(max(e) for e in errs)
    assert worst < 1e-10, errs


def _sparse_kept(rank, world):
    cases = s2_cases(world)
    return [e for lay in ("contiguous", "zigzag") for e in check_both(rank, world, lay, cases, "needed")]


@pytest.mark.parametrize("world", [2, 4])
def test_sparse_kind_exact_both_ways(world):
    """S2 layers through ``pattern=`` (tests/test_cp_s2.py runs the default; here both)."""
    errs = run_distributed(_sparse_kept, world)
    assert max(max(e) for e in errs) < 1e-10, errs


MEM_SHAPE = dict(b=1, n=128, h=4, hkv=2, d=8)  # fp32; n divisible by 2 * 4 for zigzag


def _saved_and_backward_bytes(rank, world, gather, regather):
    """(bytes of the storages saved for backward by one layer's forward, bytes this rank
    receives in its backward). A world of 1 runs the single-device op (no strategy)."""
    s = MEM_SHAPE
    q, k, v, do, cu = make_case(0, s["b"], s["n"], s["h"], s["hkv"], s["d"], [s["n"]], torch.float32)
    strat = build_strategy("allgather", gather=gather, regather=regather)
    group = dist.group.WORLD if world > 1 else None
    ctx = CPContext(strat, group, rank, world, "zigzag", s["n"], s["b"], cu, 16)
    idx = ctx.local_index
    ql, kl, vl = (t[:, idx].clone().requires_grad_() for t in (q, k, v))
    box, hooks = saved_storage_bytes()
    with hooks:
        o = ctx.attention(ql, kl, vl, causal=True)
    comm.COUNTER.reset()
    o.backward(do[:, idx])
    return box["bytes"], comm.COUNTER.total_received


def _memory_cells(rank, world):
    return {(g, r): _saved_and_backward_bytes(rank, world, g, r) for g in ("needed", "all") for r in (True, False)}


def test_saved_activations_fall_as_one_over_p():
    """Per rank, the tensors one layer keeps for backward are 1/P of one rank's (q, k, v, o and
    lse all shard), with regather; keeping the gathered K/V (regather=False) keeps more. The
    backward receives its formula: dK/dV back, plus K/V once more with regather."""
    one, _ = _saved_and_backward_bytes(0, 1, "needed", True)
    s = MEM_SHAPE
    for world in (2, 4):
        shape = LayerShape(batch=s["b"], seq_len=s["n"], cp=world, n_heads=s["h"], n_kv_heads=s["hkv"], head_dim=s["d"])
        for rank_cells in run_distributed(_memory_cells, world):
            for (gather, regather), (saved, received) in rank_cells.items():
                # zigzag + causal on one document: every rank reads every chunk, so "needed" = "all"
                assert received == build_strategy("allgather", regather=regather).backward_bytes(shape)
                if regather:
                    assert saved <= one / world + 64, (world, gather, saved, one)
                else:  # the gathered K/V of the whole row stay: more than 1/P
                    assert saved > 1.2 * one / world, (world, gather, saved, one)


def _forward_bytes(rank, world, cases):
    """Bytes this rank receives in one forward, per (layout, gather, window, doc_lens) case."""
    out = []
    for layout, gather, window, doc_lens in cases:
        b, n, h, hkv, d = 1, 16 * world, 2, 1, 4
        q, k, v, _, cu = make_case(0, b, n, h, hkv, d, doc_lens, torch.float32)
        strat = build_strategy("allgather", gather=gather)
        ctx = CPContext(strat, dist.group.WORLD, rank, world, layout, n, b, cu, 16)
        idx = ctx.local_index
        comm.COUNTER.reset()
        ctx.attention(q[:, idx], k[:, idx], v[:, idx], causal=True, window=window)
        out.append(comm.COUNTER.total_received)
    return out


def test_bytes_match_formula():
    world, chunk = 4, 2 * 1 * 16 * 1 * 4 * 4  # K and V of one rank: 2*B*C*Hkv*D*4 bytes
    formula = build_strategy("allgather").forward_bytes(
        LayerShape(batch=1, seq_len=64, cp=4, n_heads=2, n_kv_heads=1, head_dim=4, elem_bytes=4)
    )
    assert formula == 3 * chunk
    cases = [
        ("zigzag", "all", None, [64]),
        ("contiguous", "needed", None, [64]),
        ("zigzag", "needed", None, [64]),
        ("contiguous", "needed", 5, [64]),
        ("contiguous", "needed", None, [16] * world),
    ]
    full, prefix, zig, win, docs = zip(*run_distributed(_forward_bytes, world, cases))  # per case, per rank
    assert list(full) == [formula] * world
    # causal prefix only, contiguous layout: rank r receives the r chunks before it
    assert list(prefix) == [r * chunk for r in range(world)]
    # zigzag + causal: every rank's first half lies in every other rank's causal prefix
    assert list(zig) == [formula] * world
    # a window shorter than a shard: only the previous rank's chunk
    assert list(win) == [0] + [chunk] * (world - 1)
    # documents that never cross a rank boundary: nothing to exchange
    assert list(docs) == [0] * world


def test_bad_length_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by 2\\*cp=8 for zigzag"):
        build_strategy("allgather").check(n_heads=4, n_kv_heads=2, cp=4, seq_len=1000 + 2, layout="zigzag")
    with pytest.raises(ValueError, match="has \\['ulysses_size'\\], which strategy 'allgather' does not take"):
        build_strategy("allgather", ulysses_size=2)
