"""The CAD planner (parallel/cad_plan.py) on random document mixes: every query token is
computed exactly once, every shard gets exactly the keys its queries need, loads are counted
right, balance is within tolerance when achievable, a balanced placement moves nothing, and
the degenerate cases (one document, all length-1 documents, world 1) plan."""

import random

import pytest
import torch

from models.ops.attention import MaskSpec
from parallel.cad_plan import owner_runs, pair_count, plan_cad
from parallel.strategies import build_strategy
from tests.cp_check import cases_for, make_case


def _random_cu(seed, b, n):
    rng = random.Random(seed)
    starts = {row * n for row in range(b + 1)}
    for row in range(b):
        p = row * n
        while True:
            p += int(rng.lognormvariate(3.0, 1.5)) + 1
            if p >= (row + 1) * n:
                break
            starts.add(p)
    return torch.tensor(sorted(starts))


def _check_plan(plan, cu, b, n):
    """Coverage, exact key ranges, costs and loads of ``plan`` (small n: brute force)."""
    cover = torch.zeros(b, n, dtype=torch.int64)
    pos = torch.arange(n)
    load = [0] * plan.world
    flat_doc = plan.doc_of(torch.arange(b * n)).view(b, n)
    for s in plan.shards:
        cover[s.row, s.lo : s.hi] += 1
        doc = flat_doc[s.row]
        m = MaskSpec(pos, pos, doc[None], doc[None], plan.causal, plan.window)
        allowed = m.allowed(slice(s.lo, s.hi), pos, 0)  # [hi - lo, n]
        keys = allowed.any(0).nonzero().flatten()
        assert (keys.min().item(), keys.max().item() + 1) == (s.klo, s.khi), s
        assert keys.numel() == s.khi - s.klo  # the needed keys are one contiguous range
        assert int(allowed.sum()) == s.cost
        load[s.rank] += s.cost
    assert (cover == 1).all(), "every query token in exactly one shard"
    assert load == plan.load
    for r in range(plan.world):  # a rank holds exactly the union of its shards' keys
        _, kv = plan.rows(r)
        want = {s.row * n + k for s in plan.shards if s.rank == r for k in range(s.klo, s.khi)}
        assert set(kv.tolist()) == want


@pytest.mark.parametrize("seed", range(6))
def test_random_mixes(seed):
    rng = random.Random(seed)
    world = rng.choice([2, 3, 4, 8])
    layout = rng.choice(["contiguous", "zigzag"])
    causal = rng.random() < 0.7
    window = rng.choice([None, None, 7, 40])
    b, n = rng.choice([1, 2]), 2 * world * 24
    cu = _random_cu(seed, b, n)
    plan = plan_cad(cu, b, n, world, layout, causal=causal, window=window, min_shard=4, nanos=rng.choice([1, 2]))
    _check_plan(plan, cu, b, n)
    assert sum(plan.load) == sum(plan.home_load)
    # achievable here (shards cut down to 4 tokens): the tolerance holds
    assert plan.balance() <= 1.1 + 1e-9, (plan.home_balance(), plan.balance())


def test_balance_improves_on_skewed_mix_and_reports():
    # one long document and a tail of short ones (bench.cp's docs mask), world 4, zigzag
    n = 4096
    cu = torch.tensor([0, 2048, 3072, 3584, 3840, 3968, 4032, n])
    plan = plan_cad(cu, 1, n, 4, "zigzag")
    assert plan.home_balance() > 1.4 and plan.balance() <= 1.1
    report = plan.summary(n_heads=4, n_kv_heads=2, head_dim=32, elem_bytes=4)
    assert report["balance_after"] <= 1.1 and report["memory_balance"] < 1.3
    assert report["bytes_per_rank_max"] == max(plan.bytes_received(r, 4, 2, 32, 4) for r in range(4))


def test_balanced_placement_moves_nothing():
    # zigzag balances one causal document per row exactly: every shard stays home
    plan = plan_cad(torch.tensor([0, 512, 1024]), 2, 512, 4, "zigzag", min_shard=8)
    runs = owner_runs(512, 4, "zigzag")
    assert plan.home_balance() == plan.balance() == 1.0
    for s in plan.shards:
        assert any(a <= s.lo and s.hi <= b for a, b in runs[s.rank])


def test_degenerate_cases():
    n = 64
    one = plan_cad(torch.tensor([0, n]), 1, n, 4, "contiguous", min_shard=4)  # one document
    _check_plan(one, torch.tensor([0, n]), 1, n)
    assert one.balance() <= 1.1 < one.home_balance()
    ones = plan_cad(torch.arange(n + 1), 1, n, 4, "zigzag")  # all length-1 documents
    _check_plan(ones, torch.arange(n + 1), 1, n)
    assert ones.balance() == 1.0 and all(s.cost == 1 for s in ones.shards)
    solo = plan_cad(torch.tensor([0, 10, n]), 1, n, 1, "contiguous")  # world 1
    assert [s.rank for s in solo.shards] == [0, 0] and solo.bytes_received(0, 1, 1, 1, 1) == 0


def test_unsplittable_shard_stops_cleanly():
    # one document of 2 * min_shard - 1 tokens on a contiguous rank cannot be cut: the plan
    # moves what lowers the maximum and stops
    plan = plan_cad(torch.tensor([0, 64, 128]), 1, 128, 2, "contiguous", min_shard=128)
    assert plan.balance() <= plan.home_balance()


def test_pair_count_closed_form():
    for causal in (True, False):
        for window in (None, 1, 3, 50):
            for lo, hi in ((0, 1), (3, 17), (0, 40), (39, 40)):
                i = torch.arange(lo, hi)[:, None]
                j = torch.arange(40)[None, :]
                m = (j <= i) if causal else torch.ones(hi - lo, 40, dtype=torch.bool)
                if window is not None:
                    m &= ((i - j) if causal else (i - j).abs()) < window
                assert pair_count(lo, hi, 0, 40, causal, window) == int(m.sum())


def test_test_cases_really_move_queries():
    """The strategy tests' cases (tests/cp_check.py, min_shard=4) send queries away."""
    moved = 0
    for world in (2, 3, 4):
        for c in cases_for(world):
            cu = make_case(c["seed"], c["b"], c["n"], 1, 1, 1, c["doc_lens"])[-1]
            for layout in ("contiguous", "zigzag"):
                plan = plan_cad(cu, c["b"], c["n"], world, layout, causal=c["causal"], window=c["window"], min_shard=4)
                moved += sum(plan.received_rows(r)[0] for r in range(world))
    assert moved > 0


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="parallel.cp.options.softmax.min_shard=0 must be"):
        build_strategy("cad", min_shard=0)
    with pytest.raises(ValueError, match="parallel.cp.options.softmax.tolerance=0.9 must be >= 1.0"):
        build_strategy("cad", tolerance=0.9)
    with pytest.raises(ValueError, match="parallel.cp.options.softmax.ping_pong='yes' must be true or false"):
        build_strategy("cad", ping_pong="yes")
    with pytest.raises(ValueError, match="which strategy 'cad' does not take"):
        build_strategy("cad", ulysses_size=2)


def test_trainer_selects_cad_with_options():
    from tests.test_configs import _compose
    from trainer.config import cp_strategies

    cfg = _compose(
        [
            "model.mixer_pattern=[softmax]",
            "parallel.cp.strategies.softmax=cad",
            "+parallel.cp.options.softmax.ping_pong=true",
            "+parallel.cp.options.softmax.min_shard=64",
        ]
    )
    strat = cp_strategies(cfg)["softmax"]
    assert (strat.name, strat.ping_pong, strat.min_shard, strat.tolerance) == ("cad", True, 64, 1.1)
