"""Shared spawn-and-compare helpers for the CP strategy tests.

Each rank builds the same global q, k, v, dO (fp64, fixed seed), keeps its shard, runs
the strategy forward and backward, and compares its shard of o, dq, dk, dv with the
reference computed on the whole row. Returns the max errors per case. ``cases_for`` is the
common case matrix (packed documents crossing ranks, GQA, windows, lengths that are not a
multiple of the kernel block); ``run_cp`` spawns real gloo processes (a world of one runs
in this process). ``model_cells`` / ``check_model``: every registered mixer in a tiny model
under every strategy of its kind, against the same model on one device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from models.ops.attention import MaskSpec, attention_ref
from models.ops.documents import doc_ids
from parallel.context import CPContext
from parallel.mesh import build_subgroups
from parallel.spawn import run_distributed
from parallel.strategies import STRATEGIES, build_strategy, strategy_names


def make_case(seed, b, n, h, hkv, d, doc_lens, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, h, d, generator=g, dtype=dtype)
    k = torch.randn(b, n, hkv, d, generator=g, dtype=dtype)
    v = torch.randn(b, n, hkv, d, generator=g, dtype=dtype)
    do = torch.randn(b, n, h, d, generator=g, dtype=dtype)
    starts = [0]
    for row in range(b):
        for L in doc_lens:
            if starts[-1] + L < (row + 1) * n:
                starts.append(starts[-1] + L)
        starts.append((row + 1) * n)
    cu = torch.tensor(sorted(set(starts)), dtype=torch.int64)
    return q, k, v, do, cu


def reference(q, k, v, do, cu, causal, window, pattern=None):
    b, n = q.shape[:2]
    pos = torch.arange(n)
    doc = doc_ids(cu, torch.arange(b)[:, None] * n + pos[None, :])
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    if hasattr(pattern, "bind"):  # a per-document S2 pattern reads the batch's document starts
        pattern = pattern.bind(cu, b, n)
    o, lse = attention_ref(q, k, v, MaskSpec(pos, pos, doc, doc, causal, window, pattern))
    (o * do).sum().backward()
    return o.detach(), q.grad, k.grad, v.grad


def check_strategy(rank, world, strategy, layout, cases, block=16, options=None):
    """cases: list of dicts(seed, b, n, h, hkv, d, doc_lens, causal, window, and optionally
    pattern: an S2 pattern, run as the sparse kind)."""
    group = dist.group.WORLD if world > 1 else None
    strat = build_strategy(strategy, **(options or {}))
    errs = []
    for c in cases:
        q, k, v, do, cu = make_case(c["seed"], c["b"], c["n"], c["h"], c["hkv"], c["d"], c["doc_lens"])
        pattern = c.get("pattern")
        ref = reference(q, k, v, do, cu, c["causal"], c["window"], pattern)
        strat.check(n_heads=c["h"], n_kv_heads=c["hkv"], cp=world, seq_len=c["n"], layout=layout)
        sizes = strat.subgroup_sizes(world, c["h"]) if world > 1 else []
        subgroups = build_subgroups(group, world, sizes) if sizes else {}
        ctx = CPContext(strat, group, rank, world, layout, c["n"], c["b"], cu, block, subgroups)
        idx = ctx.local_index
        ql, kl, vl = (t[:, idx].clone().requires_grad_() for t in (q, k, v))
        if pattern is None:
            o = ctx.attention(ql, kl, vl, causal=c["causal"], window=c["window"])
        else:
            o = ctx.run("sparse", ql, kl, vl, causal=c["causal"], window=c["window"], pattern=pattern)
        (o * do[:, idx]).sum().backward()
        got = (o.detach(), ql.grad, kl.grad, vl.grad)
        errs.append(max((g - r[:, idx]).abs().max().item() for g, r in zip(got, ref)))
    return errs


def cases_for(world, h=4):
    n = 2 * world * 7  # 14 tokens per rank: not a multiple of the kernel block
    base = dict(b=2, n=n, d=8, h=h)
    return [
        dict(base, seed=1, hkv=h, doc_lens=[n], causal=True, window=None),  # spans all ranks
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
    return [e for layout in ("contiguous", "zigzag") for e in check_strategy(rank, world, strategy, layout, cases)]


def model_cells() -> list[tuple[str, str, str]]:
    """(mixer, strategy, layout) for every registered mixer, every multi-rank strategy serving
    its kind and every layout that strategy takes (the registries' whole product). A mixer that
    calls several kinds gets ``strategy`` = one name per kind joined by ``+`` (in its ``kinds``
    order): each multi-rank strategy of each kind once, the other kinds on their defaults, on one
    layout they all take (zigzag where they can)."""
    from models.registry import MIXERS, mixer_kinds
    from parallel.strategies import DEFAULTS

    mixer_kinds()  # loads the registry
    cells = []
    for mixer in sorted(MIXERS):
        kinds = MIXERS[mixer].kinds
        if len(kinds) == 1:
            cells += [
                (mixer, name, layout)
                for name in strategy_names(kinds[0])
                if STRATEGIES[name].kinds  # ``local`` serves one rank only
                for layout in STRATEGIES[name].layouts
            ]
            continue
        for i, kind in enumerate(kinds):
            for name in strategy_names(kind):
                if not STRATEGIES[name].kinds or (i > 0 and name == DEFAULTS[kind]):  # paired already
                    continue
                names = [name if j == i else DEFAULTS[other] for j, other in enumerate(kinds)]
                layouts = set.intersection(*(set(STRATEGIES[n].layouts) for n in names))
                cells.append((mixer, "+".join(names), "zigzag" if "zigzag" in layouts else min(layouts)))
    return cells


def _model_batch(n, b=2, vocab=61, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, n), generator=g)
    labels = torch.randint(0, vocab, (b, n), generator=g)
    cu = torch.tensor(sorted({0, 3, 4, n // 3, n - 5, n, n + 1, n + n // 2, 2 * n}))  # docs cross ranks
    flat = torch.arange(b * n)
    pos = (flat - cu[torch.searchsorted(cu, flat, right=True) - 1]).view(b, n)
    return {"input_ids": ids, "labels": labels, "positions": pos, "cu_seqlens": cu}


def _loss_and_grads(model, batch, ctx, group):
    """The summed next-token CE of ``batch`` (this rank's tokens) and every gradient, summed over
    the ranks of ``group`` (None: one device)."""
    model.zero_grad(set_to_none=True)
    loss = model(batch["input_ids"], batch["positions"], ctx, labels=batch["labels"])
    loss.backward()
    stats = torch.cat([loss.detach()[None]] + [p.grad.flatten() for p in model.parameters()])
    if group is not None:
        dist.all_reduce(stats, group=group)
    return stats


def check_model(rank, world, cells, n=128, block=16, window=9):
    """For each (mixer, strategy, layout): the max error of the CP loss and gradients (fp64)
    against the same model on one device holding the whole batch (``window``: the two-kind
    layers' softmax window)."""
    from models import ModelConfig, Transformer
    from models.context import SingleDeviceContext
    from parallel.sharding import shard_batch

    group = dist.group.WORLD
    batch = _model_batch(n)
    errs, subgroups = [], {}
    for mixer, name, layout in cells:
        torch.manual_seed(0)
        cfg = ModelConfig(
            dim=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            vocab_size=61,
            mixer_pattern=[mixer],
            s2_block=16,
            s2_stride=2,
            hybrid_window=window,
            landmark_every=5,
        )
        model = Transformer(cfg).double()
        ref = _loss_and_grads(model, batch, SingleDeviceContext(2, n, batch["cu_seqlens"], block), None)
        strats = {kind: build_strategy(s, kind) for kind, s in zip(cfg.kinds_of(0), name.split("+"))}
        for u in (u for s in strats.values() for u in s.subgroup_sizes(world, cfg.n_heads)):
            if u not in subgroups:  # every rank walks the same cells: the same collectives
                subgroups.update(build_subgroups(group, world, [u]))
        ctx = CPContext(strats, group, rank, world, layout, n, 2, batch["cu_seqlens"], block, subgroups)
        got = _loss_and_grads(model, shard_batch(batch, rank, world, layout), ctx, group)
        errs.append((mixer, name, layout, (got - ref).abs().max().item()))
    return errs
