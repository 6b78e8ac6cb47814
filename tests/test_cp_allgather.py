"""All-gather KV context parallelism vs the single-device reference (fp64, 1e-10), in both
exchange modes, and its bytes against the formula."""

import pytest
import torch
import torch.distributed as dist

from parallel import comm
from parallel.context import CPContext
from parallel.spawn import run_distributed
from parallel.strategies import LayerShape, build_strategy
from tests.cp_check import check_strategy, make_case

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


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("gather", ["needed", "all"])
def test_allgather_exact(world, layout, gather):
    if world == 1 and gather == "all":
        pytest.skip("same code path as gather=needed at world 1")
    errs = run_distributed(check_strategy, world, "allgather", layout, cases_for(world), 16, {"gather": gather})
    worst = max(max(e) for e in errs)
    assert worst < 1e-10, errs


def _forward_bytes(rank, world, layout, gather, window, doc_lens):
    b, n, h, hkv, d = 1, 16 * world, 2, 1, 4
    q, k, v, _, cu = make_case(0, b, n, h, hkv, d, doc_lens, torch.float32)
    strat = build_strategy("allgather", gather=gather)
    ctx = CPContext(strat, dist.group.WORLD, rank, world, layout, n, b, cu, 16)
    idx = ctx.local_index
    comm.COUNTER.reset()
    ctx.attention(q[:, idx], k[:, idx], v[:, idx], causal=True, window=window)
    return comm.COUNTER.total_received


def test_bytes_match_formula():
    world, chunk = 4, 2 * 1 * 16 * 1 * 4 * 4  # K and V of one rank: 2*B*C*Hkv*D*4 bytes
    formula = build_strategy("allgather").forward_bytes(
        LayerShape(batch=1, seq_len=64, cp=4, n_heads=2, n_kv_heads=1, head_dim=4, elem_bytes=4)
    )
    assert formula == 3 * chunk
    full = run_distributed(_forward_bytes, world, "zigzag", "all", None, [64])
    assert full == [formula] * world
    # causal prefix only, contiguous layout: rank r receives the r chunks before it
    prefix = run_distributed(_forward_bytes, world, "contiguous", "needed", None, [64])
    assert prefix == [r * chunk for r in range(world)]
    # zigzag + causal: every rank's first half lies in every other rank's causal prefix
    zig = run_distributed(_forward_bytes, world, "zigzag", "needed", None, [64])
    assert zig == [formula] * world
    # a window shorter than a shard: only the previous rank's chunk
    win = run_distributed(_forward_bytes, world, "contiguous", "needed", 5, [64])
    assert win == [0] + [chunk] * (world - 1)
    # documents that never cross a rank boundary: nothing to exchange
    docs = run_distributed(_forward_bytes, world, "contiguous", "needed", None, [16] * world)
    assert docs == [0] * world


def test_bad_length_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by 2\\*cp=8 for zigzag"):
        build_strategy("allgather").check(n_heads=4, n_kv_heads=2, cp=4, seq_len=1000 + 2, layout="zigzag")
    with pytest.raises(ValueError, match="has \\['ulysses_size'\\], which strategy 'allgather' does not take"):
        build_strategy("allgather", ulysses_size=2)
