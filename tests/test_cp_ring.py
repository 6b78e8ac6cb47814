"""Ring attention context parallelism vs the single-device reference (fp64, 1e-10)."""
import pytest
import torch

from models.ops.attention import MaskSpec
from parallel.strategies.ring import may_attend
from tests.cp_check import check_strategy
from tests.distributed import run_distributed


def cases_for(world, h=4):
    n = 2 * world * 7   # 14 tokens per rank: not a multiple of the kernel block
    base = dict(b=2, n=n, d=8, h=h)
    return [
        dict(base, seed=1, hkv=h, doc_lens=[n], causal=True, window=None),           # spans all ranks
        dict(base, seed=2, hkv=h // 2, doc_lens=[1, 5, 2 * n // 3, 1, 9], causal=True, window=None),
        dict(base, seed=3, hkv=h // 4, doc_lens=[3, n // 2 + 5], causal=True, window=5),
        dict(base, seed=4, hkv=h // 4, doc_lens=[7, 1, n], causal=True, window=n // world + 3),
        dict(base, seed=5, hkv=h // 2, doc_lens=[n // 3, 2], causal=False, window=None),
        dict(base, seed=6, hkv=h, doc_lens=[1, n // 2, 1], causal=False, window=4),
        dict(base, seed=7, b=1, hkv=h // 2, doc_lens=[1] * 3 + [n], causal=False, window=n // world + 2),
    ]


def run_cp(fn, world, *args):
    """run_distributed, but a world of 1 runs in this process (it needs no process group)."""
    return [fn(0, 1, *args)] if world == 1 else run_distributed(fn, world, *args)


def check_layouts(rank, world, strategy, cases):
    """Both layouts in one spawn (each spawn costs seconds)."""
    return [e for layout in ("contiguous", "zigzag")
            for e in check_strategy(rank, world, strategy, layout, cases)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ring_exact(world):
    errs = run_cp(check_layouts, world, "ring", cases_for(world))
    worst = max(max(e) for e in errs)
    assert worst < 1e-10, errs


def test_may_attend_is_conservative_and_skips():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        tq, tk = 20, 12
        q_pos = torch.randperm(40, generator=g)[:tq].sort().values
        k_pos = torch.randperm(40, generator=g)[:tk].sort().values
        q_doc = torch.randint(0, 4, (2, tq), generator=g).sort().values
        k_doc = torch.randint(0, 4, (2, tk), generator=g).sort().values
        causal = bool(trial % 2)
        window = None if trial % 3 == 0 else int(torch.randint(1, 20, (1,), generator=g))
        m = MaskSpec(q_pos, k_pos, q_doc, k_doc, causal, window)
        dense = any(m.allowed(slice(None), torch.arange(tk), b).any() for b in range(2))
        if dense:
            assert may_attend(m, 8)
    pos0, pos1 = torch.arange(0, 14), torch.arange(14, 28)
    one = torch.zeros(1, 14, dtype=torch.int64)
    assert not may_attend(MaskSpec(pos0, pos1, one, one, True, None), 16)           # future keys
    assert may_attend(MaskSpec(pos0, pos1, one, one, False, None), 16)
    assert not may_attend(MaskSpec(pos1, pos0, one, one + 1, True, None), 16)       # other document
    assert not may_attend(MaskSpec(pos1 + 14, pos0, one, one, True, 10), 16)        # out of window
