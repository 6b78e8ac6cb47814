"""Linear-attention CP (lasp2, lasp1) against the single-device op on the whole row.

One spawn per world size (1 runs in-process) computes every case, probe, byte count and the
hybrid-model check at once (``_results``, cached); the tests below only read it.
Shapes: C = 6 tokens per rank (N = 6P), B = 2, H = 2, Dk = Dv = 4, fp64, tolerance 1e-10 for
o, dq, dk, dv, dg, dgk against ``recurrent_linear_attention_ref`` on the whole row; decay none /
scalar / per-key / both, g = 0 and g = -30, documents crossing 1-3 boundaries, length-1 docs,
chunk sizes 4 and 64 (not dividing the segments). lasp2 runs its fused path (impl auto: the
chunked torch op with its hooks) everywhere and its generic autograd path (impl naive) at
worlds 2 and 3; the byte counts check both. The hybrid model (gla, simple_gla, lightning,
softmax layers) compares CP=P (allgather + lasp2) with CP=1 in fp32 to 1e-5.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from models import ModelConfig, Transformer
from models.ops.linear_attention import recurrent_linear_attention_ref
from parallel import comm
from parallel.context import CPContext
from parallel.sharding import shard_batch, unshard
from parallel.spawn import run_distributed
from parallel.strategies import LayerShape, build_strategy

pytestmark = pytest.mark.gloo  # spawns multi-process gloo groups

WORLDS = [1, 2, 3, 4, 8]
C, B, H, DK, DV, SCALE = 6, 2, 2, 4, 4, 0.5
RUNS = [("lasp2", "contiguous"), ("lasp2", "zigzag"), ("lasp1", "contiguous")]
KEEP = {"recompute": False}  # intermediates kept for backward instead of recomputed
KEEP_RUNS = [("lasp2", "zigzag", KEEP), ("lasp1", "contiguous", KEEP)]  # worlds 2, 3 only (time)
# lasp2 runs a fused path on the chunked torch op (impl auto on CPU) and a generic autograd
# path for any other impl: the token-by-token reference covers the latter (worlds 2, 3)
GENERIC_RUNS = [("lasp2", "contiguous", {}, "naive"), ("lasp2", "zigzag", KEEP, "naive")]


def error_runs(world):
    runs = [(s, lay, {}, "auto") for s, lay in RUNS]
    if world in (2, 3):
        runs += [(s, lay, opt, "auto") for s, lay, opt in KEEP_RUNS] + GENERIC_RUNS
    return runs


# document starts per row (clipped to the row): with C = 6, rank boundaries (contiguous) sit at
# multiples of 6, zigzag chunk boundaries at multiples of 3
ONE = [0]
L1 = [0, 1, 2, 9, 20, 21, 27, 40]  # len-1 docs; [2,9) crosses 1, [9,20) 2, [27,40) 2
L2 = [0, 3, 23, 24, 25, 43]  # [3,23) crosses 3; [24,25) starts on a boundary
L3 = [0, 6, 7, 12, 18, 19, 30, 31, 36]  # starts on boundaries, len-1 docs right after them
L4 = [0, 3, 15, 45]  # [3, 15) holds the whole of rank 1 (and chunks 1-4)
CASES = {  # name: (decay, row starts, chunk_size, constant g, log-decay scale)
    "none": ("none", (ONE, ONE), 64, None, 1.0),
    "scalar": ("scalar", (L1, L2), 4, None, 1.0),
    "key": ("key", (L2, L1), 4, None, 1.0),
    "both": ("both", (L3, L1), 64, None, 1.0),
    "g=0": ("scalar", (L1, ONE), 4, 0.0, 1.0),
    "g=-30": ("scalar", (ONE, L2), 4, -30.0, 1.0),
    # weak decay (|g| ~ 0.03): a state carried across whole ranks stays O(1), so a bug in the
    # inter-rank carry (its value or the gradient of a rank's total decay) shows
    "weak scalar": ("scalar", (L4, ONE), 4, None, 0.2),
    "weak both": ("both", (ONE, L4), 64, None, 0.2),
}


def make_case(seed, n, decay, rows, g_value=None, weight=1.0, dtype=torch.float64):
    """weight scales the log-decays (logsigmoid(x + 2), about -0.15 on average)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    q, k, v, do = rnd(B, n, H, DK), rnd(B, n, H, DK), rnd(B, n, H, DV), rnd(B, n, H, DV)
    g = weight * F.logsigmoid(rnd(B, n, H) + 2) if decay in ("scalar", "both") else None
    gk = weight * F.logsigmoid(rnd(B, n, H, DK) + 2) if decay in ("key", "both") else None
    if g_value is not None:
        g = torch.full((B, n, H), g_value, dtype=dtype)
    starts = {r * n + s for r, row in enumerate(rows) for s in row if s < n} | {r * n for r in range(B)}
    cu = torch.tensor(sorted(starts) + [B * n])
    return dict(q=q, k=k, v=v, g=g, gk=gk, do=do, cu=cu)


def _inputs(case, idx=None):
    names = ("q", "k", "v", "g", "gk")
    return [
        None if case[x] is None else (case[x] if idx is None else case[x][:, idx]).clone().requires_grad_()
        for x in names
    ]


def _grads(o, do, inputs):
    live = [x for x in inputs if x is not None]
    grads = iter(torch.autograd.grad((o * do).sum(), live))
    return [None if x is None else next(grads) for x in inputs]


def reference(case):
    inputs = _inputs(case)
    o = recurrent_linear_attention_ref(*inputs, SCALE, cu_seqlens=case["cu"])[0]
    return [o.detach()] + _grads(o, case["do"], inputs)


def _run(strategy, layout, rank, world, case, n, chunk=64, options=None, impl="auto"):
    """This rank's (o, dq, dk, dv, dg, dgk) shard and its local index."""
    group = dist.group.WORLD if world > 1 else None
    ctx = CPContext(build_strategy(strategy, **(options or {})), group, rank, world, layout, n, B, case["cu"])
    idx = ctx.local_index
    inputs = _inputs(case, idx)
    q, k, v, g, gk = inputs
    o = ctx.linear_attention(q, k, v, g=g, gk=gk, scale=SCALE, chunk_size=chunk, impl=impl)
    return [o.detach()] + _grads(o, case["do"][:, idx], inputs), idx


def _errors(rank, world):
    n, errs = C * world, {}
    for seed, (name, (decay, rows, chunk, g_value, weight)) in enumerate(CASES.items()):
        case = make_case(seed, n, decay, rows, g_value, weight)
        ref = reference(case)
        for strategy, layout, options, impl in error_runs(world):
            got, idx = _run(strategy, layout, rank, world, case, n, chunk, options, impl)
            assert all(x is None or torch.isfinite(x).all() for x in got)
            strategy += ("" if options.get("recompute", True) else "/keep") + ("" if impl == "auto" else "/naive")
            errs[(strategy, layout, name)] = max(
                (a - r[:, idx]).abs().max().item() for a, r in zip(got, ref) if a is not None
            )
            if g_value == -30.0:  # the prefix vanishes: each token sees (almost) only itself
                q, k, v = (case[x][:, idx] for x in "qkv")
                own = SCALE * (q * k).sum(-1, keepdim=True) * v
                errs[(strategy, layout, "g=-30 self only")] = (got[0] - own).abs().max().item()
    return errs


def _probe(rank, world, t=None):
    """Perturb token t of row 0 (q, k, v): |o' - o| per local token [B, C] for each run."""
    n = C * world
    t = n // 2 + 1 if t is None else t
    case = make_case(99, n, "key", (ONE, ONE))
    bumped = dict(case)
    for x in "qkv":
        bumped[x] = case[x].clone()
        bumped[x][0, t] += 1.0
    out = {}
    for strategy, layout in RUNS:
        base, idx = _run(strategy, layout, rank, world, case, n, 4)
        new, _ = _run(strategy, layout, rank, world, bumped, n, 4)
        out[(strategy, layout)] = ((new[0] - base[0]).abs().amax((-1, -2)), idx)
    return t, out


def _bytes(rank, world):
    """Received bytes per (run, impl, seq_len): (forward, backward), fp32 inputs."""
    out = {}
    for n in (C * world, 10 * world):
        case = make_case(5, n, "both", (L1, L2), dtype=torch.float32)
        for strategy, layout, impl in [(s, lay, "auto") for s, lay in RUNS] + [("lasp2", "zigzag", "naive")]:
            group = dist.group.WORLD if world > 1 else None
            ctx = CPContext(build_strategy(strategy), group, rank, world, layout, n, B, case["cu"])
            q, k, v, g, gk = _inputs(case, ctx.local_index)
            comm.COUNTER.reset()
            o = ctx.linear_attention(q, k, v, g=g, gk=gk, scale=SCALE, impl=impl)
            fwd = dict(comm.COUNTER.received)
            comm.COUNTER.reset()
            o.sum().backward()
            out[(strategy, layout, impl, n)] = (fwd, dict(comm.COUNTER.received))
    return out


# ----------------------------------------------------------------------------- hybrid model
MODEL_N = 48


def _batch(n, b=2, vocab=257, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, n), generator=g)
    labels = torch.randint(0, vocab, (b, n), generator=g)
    cu = torch.tensor(sorted({0, 3, 4, n // 3, n - 5, n, n + 1, n + n // 2, 2 * n}))
    flat = torch.arange(b * n)
    pos = (flat - cu[torch.searchsorted(cu, flat, right=True) - 1]).view(b, n)
    return {"input_ids": ids, "labels": labels, "positions": pos, "cu_seqlens": cu}


def _model_loss_and_grads(rank, world, layout):
    torch.manual_seed(0)
    cfg = ModelConfig(
        dim=64, n_layers=4, n_heads=4, n_kv_heads=2, mixer_pattern=["gla", "simple_gla", "lightning", "softmax"]
    )
    model = Transformer(cfg)
    batch = _batch(MODEL_N)
    local = shard_batch(batch, rank, world, layout)
    if world == 1:
        ctx = CPContext(build_strategy("local"), None, 0, 1, layout, MODEL_N, 2, batch["cu_seqlens"], block=16)
    else:
        strategies = {"softmax": build_strategy("allgather"), "linear": build_strategy("lasp2")}
        ctx = CPContext(strategies, dist.group.WORLD, rank, world, layout, MODEL_N, 2, batch["cu_seqlens"], block=16)
    logits = model(local["input_ids"], local["positions"], ctx)
    ce = F.cross_entropy(logits.flatten(0, 1), local["labels"].flatten(), reduction="sum")
    ce.backward()
    stats = ce.detach().clone()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    if world > 1:
        dist.all_reduce(stats)
        dist.all_reduce(grads)
    return stats.item() / batch["labels"].numel(), grads


MODEL_WORLDS = (2, 4)


def _rank_main(rank, world):
    res = {"errors": _errors(rank, world), "probe": _probe(rank, world), "bytes": _bytes(rank, world)}
    if world in MODEL_WORLDS:
        res["model"] = {lay: _model_loss_and_grads(rank, world, lay) for lay in ("contiguous", "zigzag")}
    return res


@functools.cache
def _model_reference():
    return _model_loss_and_grads(0, 1, "contiguous")


@functools.cache
def _results(world):
    if world == 1:
        return [_rank_main(0, 1)]
    return run_distributed(_rank_main, world, timeout=300)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("world", WORLDS)
def test_exact_against_single_device(world):
    """o, dq, dk, dv, dg, dgk to 1e-10 for every case, layout and strategy, on every rank."""
    worst = {}
    for res in _results(world):
        for key, e in res["errors"].items():
            worst[key] = max(worst.get(key, 0.0), e)
    bad = {k: e for k, e in worst.items() if not e < 1e-10}
    assert not bad, bad
    assert len(worst) == len(error_runs(world)) * (len(CASES) + 1)


@pytest.mark.parametrize("world", WORLDS)
def test_causality_probe(world):
    """Perturbing token t changes outputs at t and after (row 0), never before, never row 1."""
    res = _results(world)
    t = res[0]["probe"][0]
    for run in RUNS:
        diffs = [r["probe"][1][run][0] for r in res]
        full = unshard(diffs[0], diffs, C * world, world, run[1])  # [B, N]
        assert (full[0, :t] == 0).all(), run
        assert (full[0, t:] > 0).all(), run
        assert (full[1] == 0).all(), run


@pytest.mark.parametrize("world", WORLDS)
def test_bytes_match_formula_and_are_flat(world):
    res = _results(world)
    for strategy, layout, impl in [(s, lay, "auto") for s, lay in RUNS] + [("lasp2", "zigzag", "naive")]:
        strat = build_strategy(strategy)
        per_n = []
        for n in (C * world, 10 * world):
            formula = strat.forward_bytes(
                LayerShape(
                    batch=B,
                    seq_len=n,
                    cp=world,
                    n_heads=H,
                    n_kv_heads=H,
                    head_dim=DV,
                    key_dim=DK,
                    elem_bytes=4,
                    layout=layout,
                )
            )
            got = [r["bytes"][(strategy, layout, impl, n)] for r in res]
            if world == 1:
                assert formula == 0 and all(f == {} and b == {} for f, b in got)
            elif strategy == "lasp2":
                segs = 2 if layout == "zigzag" else 1
                assert formula == (world - 1) * segs * (B * H * DK * DV + B * H * DK) * 4
                assert all(f == {"all_gather": formula} for f, _ in got), got  # one all-gather forward
                if impl == "auto":  # fused path: one all-gather of dL/dS_in backward
                    assert all(b == {"all_gather": (world - 1) * segs * B * H * DK * DV * 4} for _, b in got), got
                else:  # generic path: one reduce-scatter of the summaries' gradients
                    assert all(b == {"reduce_scatter": formula} for _, b in got), got
            else:  # lasp1: one state per hop; rank 0 receives nothing forward, P-1 nothing back
                assert formula == B * H * DK * DV * 4
                assert [f.get("send_recv", 0) for f, _ in got] == [0] + [formula] * (world - 1)
                assert [b.get("send_recv", 0) for _, b in got] == [formula] * (world - 1) + [0]
            per_n.append(got)
        assert per_n[0] == per_n[1]  # flat in N


@pytest.mark.parametrize("world", MODEL_WORLDS)
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_hybrid_model_cp_matches_single(world, layout):
    """gla / simple_gla / lightning layers by lasp2, softmax by allgather: CP=P == CP=1."""
    ref_loss, ref_grads = _model_reference()
    for res in _results(world):
        loss, grads = res["model"][layout]
        assert abs(loss - ref_loss) < 1e-5
        assert (grads - ref_grads).abs().max() < 1e-5


def test_lasp1_rejects_zigzag_and_kinds_are_checked():
    with pytest.raises(ValueError, match="parallel.cp.layout='zigzag'"):
        build_strategy("lasp1").check(n_heads=2, n_kv_heads=2, cp=2, seq_len=24, layout="zigzag")
    build_strategy("lasp2").check(n_heads=2, n_kv_heads=2, cp=2, seq_len=24, layout="zigzag")
    for name in ("lasp1", "lasp2"):
        with pytest.raises(ValueError, match=f"strategies.softmax='{name}' serves linear layers"):
            build_strategy(name, "softmax")
    with pytest.raises(ValueError, match="strategies.linear='ring' serves softmax and sparse layers"):
        build_strategy("ring", "linear")
    # a CP context without a strategy for a kind refuses it instead of running locally
    ctx = CPContext(build_strategy("lasp2"), None, 0, 2, "zigzag", 12, 1, torch.tensor([0, 12]))
    x = torch.zeros(1, 6, 1, 2)
    with pytest.raises(ValueError, match="parallel.cp.strategies.softmax"):
        ctx.attention(x, x, x)
