"""All-gather KV context parallelism vs the single-device reference (fp64, 1e-10)."""
import pytest

from tests.cp_check import check_strategy
from tests.distributed import run_distributed


def cases_for(world):
    n = 2 * world * 7   # 14 tokens per rank: not a multiple of the kernel block
    base = dict(b=2, n=n, d=8)
    return [
        dict(base, seed=1, h=4, hkv=4, doc_lens=[n], causal=True, window=None),
        dict(base, seed=2, h=4, hkv=2, doc_lens=[1, 5, 2 * n // 3, 1, 9], causal=True, window=None),
        dict(base, seed=3, h=4, hkv=1, doc_lens=[3, n // 2 + 5], causal=True, window=5),
        dict(base, seed=4, h=2, hkv=1, doc_lens=[7, 1, n], causal=True, window=n // world + 3),
        dict(base, seed=5, h=4, hkv=2, doc_lens=[n // 3, 2], causal=False, window=None),
    ]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_allgather_exact(world, layout):
    errs = run_distributed(check_strategy, world, "allgather", layout, cases_for(world))
    worst = max(max(e) for e in errs)
    assert worst < 1e-10, errs


def test_bad_length_is_a_clear_error():
    from parallel.strategies import build_strategy
    with pytest.raises(ValueError, match="not divisible by 2\\*cp=8 for zigzag"):
        build_strategy("allgather").check(n_heads=4, n_kv_heads=2, cp=4, seq_len=1000 + 2, layout="zigzag")
