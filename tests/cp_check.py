"""Shared checks of a CP attention strategy against the dense single-device reference.

Each rank builds the same global q, k, v, dO (fp64, fixed seed), keeps its shard, runs
the strategy forward and backward, and compares its shard of o, dq, dk, dv with the
reference computed on the whole row. Returns the max errors per case.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from models.ops.attention import MaskSpec, attention_ref, doc_ids
from parallel.context import CPContext
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


def reference(q, k, v, do, cu, causal, window):
    b, n = q.shape[:2]
    pos = torch.arange(n)
    doc = doc_ids(cu, torch.arange(b)[:, None] * n + pos[None, :])
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    o, lse = attention_ref(q, k, v, MaskSpec(pos, pos, doc, doc, causal, window))
    (o * do).sum().backward()
    return o.detach(), q.grad, k.grad, v.grad


def check_strategy(rank, world, strategy, layout, cases, block=16, options=None):
    """cases: list of dicts(seed, b, n, h, hkv, d, doc_lens, causal, window)."""
    group = dist.group.WORLD if world > 1 else None
    strat = build_strategy(strategy, **(options or {}))
    errs = []
    for c in cases:
        q, k, v, do, cu = make_case(c["seed"], c["b"], c["n"], c["h"], c["hkv"], c["d"], c["doc_lens"])
        ref = reference(q, k, v, do, cu, c["causal"], c["window"])
        strat.check(n_heads=c["h"], n_kv_heads=c["hkv"], cp=world, seq_len=c["n"], layout=layout)
        ctx = CPContext(strat, group, rank, world, layout, c["n"], c["b"], cu, block)
        idx = ctx.local_index
        ql, kl, vl = (t[:, idx].clone().requires_grad_() for t in (q, k, v))
        o = ctx.attention(ql, kl, vl, causal=c["causal"], window=c["window"])
        (o * do[:, idx]).sum().backward()
        got = (o.detach(), ql.grad, kl.grad, vl.grad)
        errs.append(max((g - r[:, idx]).abs().max().item() for g, r in zip(got, ref)))
    return errs
