"""MLA context parallelism (parallel/strategies/mla_latent.py) vs the single-device op (fp64):
``mla_latent`` (moves the latent) and ``mla_kv`` (up-projects, then a softmax strategy) at worlds
1-4, both layouts, packed documents crossing ranks, windows; forward and every gradient (the
up-projection's summed over ranks). Bytes per rank against the formula, beside GQA all-gather;
a planted bug (the shared RoPE key's gradient not summed over heads) fails."""

import pytest
import torch
import torch.distributed as dist

from models.context import SingleDeviceContext
from models.mla_attention import local_mla_ref
from parallel import comm
from parallel.context import CPContext
from parallel.mesh import build_subgroups
from parallel.spawn import run_distributed
from parallel.strategies import LayerShape, build_strategy

pytestmark = pytest.mark.gloo  # spawns multi-process gloo groups

H, DN, DR, DV, DC = 4, 6, 4, 12, 10


def cases_for(world):
    n = 2 * world * 7  # 14 tokens per rank: not a multiple of the kernel block
    return [
        dict(seed=1, b=2, n=n, docs=[n], causal=True, window=None),  # spans all ranks
        dict(seed=2, b=2, n=n, docs=[1, 5, 2 * n // 3, 1, 9], causal=True, window=None),
        dict(seed=3, b=2, n=n, docs=[3, n // 2 + 5], causal=True, window=5),
        dict(seed=4, b=1, n=n, docs=[7, 1, n], causal=False, window=n // world + 3),
    ]


def _case(c, dv=DV):
    g = torch.Generator().manual_seed(c["seed"])
    b, n = c["b"], c["n"]

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    inputs = (r(b, n, H, DN + DR), r(b, n, 1, DC), r(b, n, 1, DR), r(H * (DN + dv), DC) / DC**0.5)
    starts = [0]
    for row in range(b):
        for L in c["docs"]:
            if starts[-1] + L < (row + 1) * n:
                starts.append(starts[-1] + L)
        starts.append((row + 1) * n)
    return inputs, r(b, n, H, dv), torch.tensor(sorted(set(starts)))


def _run(op, inputs, ctx, do, idx, c, dv):
    xs = [x[:, idx].clone().requires_grad_() for x in inputs[:3]] + [inputs[3].clone().requires_grad_()]
    o = op(*xs[:3], ctx, kv_b=xs[3], v_head_dim=dv, causal=c["causal"], window=c["window"], scale=0.37)
    (o * do[:, idx]).sum().backward()
    return [o.detach()] + [x.grad for x in xs]


def check(rank, world, name, options, bug=False, dv=DV):
    """Max error over cases and both layouts; the strategy is called directly (a CP world of one
    would otherwise run the single-device op)."""
    if bug:
        import parallel.strategies.mla_latent as m

        m.shared_key_grad = lambda dk: dk[:, :, :1]
    group = dist.group.WORLD
    strat = build_strategy(name, "mla", **options)
    sizes = strat.subgroup_sizes(world, H) if world > 1 else []
    subgroups = build_subgroups(group, world, sizes) if sizes else {}
    errs = []
    for layout in ("contiguous", "zigzag"):
        for c in cases_for(world):
            inputs, do, cu = _case(c, dv)
            b, n = c["b"], c["n"]
            ref = _run(local_mla_ref, inputs, SingleDeviceContext(b, n, cu, 16), do, torch.arange(n), c, dv)
            strat.check(n_heads=H, n_kv_heads=H, cp=world, seq_len=n, layout=layout)
            ctx = CPContext(strat, group, rank, world, layout, n, b, cu, 16, subgroups)
            got = _run(strat, inputs, ctx, do, ctx.local_index, c, dv)
            dist.all_reduce(got[4])  # the up-projection's gradient: each rank holds its share
            idx = ctx.local_index
            errs.append(
                max((x - (r if i == 4 else r[:, idx])).abs().max().item() for i, (x, r) in enumerate(zip(got, ref)))
            )
    return max(errs)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_mla_latent_exact(world):
    opts = [{"gather": "needed"}] if world == 1 else [{"gather": "needed"}, {"gather": "all"}]
    for o in opts:
        errs = run_distributed(check, world, "mla_latent", o)
        assert max(errs) < 1e-10, (o, errs)


def test_mla_latent_exact_v_wider_than_qk():
    errs = run_distributed(check, 2, "mla_latent", {"gather": "all"}, False, 2 * (DN + DR))
    assert max(errs) < 1e-10, errs


def test_planted_bug_rope_key_grad_not_summed_fails():
    errs = run_distributed(check, 2, "mla_latent", {"gather": "all"}, True)
    assert max(errs) > 1e-3, errs


@pytest.mark.parametrize("world,softmax", [(2, "allgather"), (2, "ring"), (4, "ulysses"), (3, "usp")])
def test_mla_kv_serves_softmax_strategies(world, softmax):
    errs = run_distributed(check, world, "mla_kv", {"softmax": softmax})
    assert max(errs) < 1e-10, errs


def _bytes(rank, world, b, n):
    """Bytes this rank receives in one forward of mla_latent (gather=all) and of GQA all-gather."""
    group = dist.group.WORLD
    cu = torch.tensor([0, n, 2 * n])[: b + 1]
    inputs, _, _ = _case(dict(seed=1, b=b, n=n, docs=[n]))
    ctx = CPContext(build_strategy("mla_latent", "mla", gather="all"), group, rank, world, "zigzag", n, b, cu, 16)
    idx = ctx.local_index
    out = {}
    comm.COUNTER.reset()
    with torch.no_grad():
        ctx.strategies["mla"](*(x[:, idx] for x in inputs[:3]), ctx, kv_b=inputs[3], v_head_dim=DV)
    out["mla_latent"] = comm.COUNTER.total_received
    gqa = build_strategy("allgather", "softmax", gather="all")
    ctx = CPContext(gqa, group, rank, world, "zigzag", n, b, cu, 16)
    q = inputs[0][:, idx]
    kv = torch.zeros(b, len(idx), 2, DN + DR, dtype=torch.float64)
    comm.COUNTER.reset()
    with torch.no_grad():
        ctx.attention(q, kv, kv)
    out["allgather"] = comm.COUNTER.total_received
    return out


def test_bytes_equal_formula():
    world, b, n = 4, 2, 56
    got = run_distributed(_bytes, world, b, n)
    latent = build_strategy("mla_latent", "mla", gather="all")
    gqa = build_strategy("allgather", "softmax", gather="all")
    mla_shape = LayerShape(b, n, world, H, H, DN + DR, elem_bytes=8, latent_dim=DC + DR)
    gqa_shape = LayerShape(b, n, world, H, 2, DN + DR, elem_bytes=8)
    for per_rank in got:
        assert (
            per_rank["mla_latent"] == latent.forward_bytes(mla_shape) == (world - 1) * b * (n // world) * (DC + DR) * 8
        )
        assert per_rank["allgather"] == gqa.forward_bytes(gqa_shape)
