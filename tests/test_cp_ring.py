"""Ring attention context parallelism vs the single-device reference (fp64, 1e-10)."""

import pytest
import torch

from models.ops.attention import MaskSpec
from parallel.strategies.ring import may_attend
from tests.cp_check import cases_for, check_layouts, run_cp


@pytest.mark.gloo
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
    assert not may_attend(MaskSpec(pos0, pos1, one, one, True, None), 16)  # future keys
    assert may_attend(MaskSpec(pos0, pos1, one, one, False, None), 16)
    assert not may_attend(MaskSpec(pos1, pos0, one, one + 1, True, None), 16)  # other document
    assert not may_attend(MaskSpec(pos1 + 14, pos0, one, one, True, 10), 16)  # out of window
