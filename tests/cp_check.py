"""Shared spawn-and-compare helpers for the CP strategy tests.

Each rank builds the same global q, k, v, dO (fp64, fixed seed), keeps its shard, runs
the strategy forward and backward, and compares its shard of o, dq, dk, dv with the
reference computed on the whole row. Returns the max errors per case. ``cases_for`` is the
common case matrix (packed documents crossing ranks, GQA, windows, lengths that are not a
multiple of the kernel block); ``run_cp`` spawns real gloo processes (a world of one runs
in this process).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from models.ops.attention import MaskSpec, attention_ref
from models.ops.documents import doc_ids
from parallel.context import CPContext
from parallel.mesh import build_subgroups
from parallel.spawn import run_distributed
from parallel.strategies import build_strategy


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
