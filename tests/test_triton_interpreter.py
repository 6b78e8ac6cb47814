"""fla's Triton kernels (chunk simple-GLA and GLA) on CPU under Triton's interpreter, against
longctx's own chunk op: alone with cu_seqlens and per-row initial states (through longctx's fla
dispatch), and inside LASP-2 on 2 gloo ranks. Everything runs in spawned processes: the
interpreter must be on before triton / fla are imported (tests/triton_interpreter.py)."""

import pytest
import torch

from parallel.spawn import run_distributed
from tests import triton_interpreter

pytestmark = [pytest.mark.gloo, pytest.mark.slow]
REASON = triton_interpreter.available()


def _case(b, t, h, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(b, t, h, d, generator=g) for _ in range(4))
    gate = -torch.rand(b, t, h, generator=g) * 0.2
    gk = -torch.rand(b, t, h, d, generator=g) * 0.2
    return q, k, v, do, gate, gk


def _run(q, k, v, do, decay, per_key, impl, h0=None, cu=None):
    """(o, final state, grads of q, k, v, decay[, h0]) of the dispatching op."""
    from models.ops.linear_attention import chunk_linear_attention

    leaves = [x.clone().requires_grad_() for x in (q, k, v, decay)]
    h0 = None if h0 is None else h0.clone().requires_grad_()
    kw = {"gk": leaves[3]} if per_key else {"g": leaves[3]}
    o, fin = chunk_linear_attention(*leaves[:3], **kw, scale=0.25, initial_state=h0, cu_seqlens=cu,
                                    chunk_size=16, output_final_state=True, impl=impl)  # fmt: skip
    (o * do).sum().backward()
    return [o.detach(), fin.detach()] + [x.grad for x in leaves] + ([] if h0 is None else [h0.grad])


def _alone(rank, world):
    triton_interpreter.enable()
    q, k, v, do, gate, gk = _case(2, 40, 2, 16)
    h0 = torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.3
    cu = torch.tensor([0, 13, 40, 41, 80])  # documents inside rows, a row start inside one
    errs = {}
    for name, decay, per_key in (("simple_gla", gate, False), ("gla", gk, True)):
        fla = _run(q, k, v, do, decay, per_key, "fla", h0, cu)
        ours = _run(q, k, v, do, decay, per_key, "chunk", h0, cu)
        errs[name] = max((a - b).abs().max().item() for a, b in zip(fla, ours))
    return errs


def _lasp2(rank, world):
    triton_interpreter.enable()
    import torch.distributed as dist

    from parallel.context import CPContext
    from parallel.strategies import build_strategy

    n = 48
    q, k, v, do, gate, gk = _case(1, n, 2, 16, seed=2)
    cu = torch.tensor([0, 5, 30, n])  # the middle document crosses the rank boundary
    errs = {}
    for layout in ("contiguous", "zigzag"):
        ctx = CPContext(build_strategy("lasp2"), dist.group.WORLD, rank, world, layout, n, 1, cu)
        idx = ctx.local_index
        for name, decay in (("simple_gla", gate), ("gla", gk)):
            got = {}
            for impl in ("fla", "chunk"):
                leaves = [x[:, idx].clone().requires_grad_() for x in (q, k, v, decay)]
                kw = {"gk": leaves[3]} if decay.dim() == 4 else {"g": leaves[3]}
                o = ctx.linear_attention(*leaves[:3], **kw, scale=0.25, chunk_size=16, impl=impl)
                (o * do[:, idx]).sum().backward()
                got[impl] = [o.detach()] + [x.grad for x in leaves]
            errs[(layout, name)] = max((a - b).abs().max().item() for a, b in zip(got["fla"], got["chunk"]))
    return errs


@pytest.mark.skipif(REASON is not None, reason=str(REASON))
def test_fla_kernels_match_the_chunk_op_with_documents_and_initial_states():
    errs = run_distributed(_alone, 1, timeout=600)[0]
    assert all(0 < e < 1e-4 for e in errs.values()), errs  # > 0: two different implementations ran


@pytest.mark.skipif(REASON is not None, reason=str(REASON))
def test_fla_kernels_inside_lasp2_at_world_2():
    for errs in run_distributed(_lasp2, 2, timeout=900):
        assert all(0 < e < 1e-4 for e in errs.values()), errs
