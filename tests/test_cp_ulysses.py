"""Ulysses (all-to-all) context parallelism vs the single-device reference (fp64, 1e-10)."""

import pytest

from tests.cp_check import cases_for, check_layouts, run_cp

pytestmark = pytest.mark.gloo  # spawns multi-process gloo groups

HEADS = {1: 4, 2: 4, 3: 6, 4: 4}  # query heads must divide by the CP size


def ulysses_cases(world):
    cases = cases_for(world, HEADS[world])
    if world == 3:  # Hkv=2 on 3 ranks: kv heads replicated to lcm(2, 3) = 6
        cases.append(dict(cases[1], seed=8, hkv=2))
    return cases


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ulysses_exact(world):
    errs = run_cp(check_layouts, world, "ulysses", ulysses_cases(world))
    worst = max(max(e) for e in errs)
    assert worst < 1e-10, errs


def test_heads_not_divisible_is_a_clear_error():
    from parallel.strategies import build_strategy

    with pytest.raises(ValueError, match="model.n_heads=6 is not divisible by parallel.cp.size=4 for ulysses"):
        build_strategy("ulysses").check(n_heads=6, n_kv_heads=2, cp=4, seq_len=64, layout="zigzag")
    build_strategy("ulysses").check(n_heads=8, n_kv_heads=1, cp=4, seq_len=64, layout="zigzag")
