"""Linear-attention CP benchmark: LASP-2 and LASP-1 against ring (softmax) attention.

    python -m bench.linear_cp                           # CPU defaults: world 1 2 4, N 2048 8192
    python -m bench.linear_cp --world-sizes 2 4 --seq-lens 8192 32768 --decay key

Same conventions and CSV columns as bench/cp.py (both run on bench/runner.py): each cell runs as
real processes (gloo on CPU, NCCL on CUDA) and reports forward+backward time of one layer
(median of repeats, slowest rank), bytes received per rank in the forward measured by
parallel.comm (max over ranks) and by the strategy's formula, peak memory per rank (CUDA:
max_memory_allocated; CPU: bytes saved for backward, via saved-tensor hooks, each storage
counted once), max error of the output and gradients against the single-rank op on the whole
row, and compute balance.

Strategies are ``name[:layout]`` (default layout: --layout; lasp2:zigzag is what a hybrid
model whose softmax layers use zigzag runs, at twice the bytes): lasp2 and lasp1 run linear
attention on q, k [1, N, H, D], v [1, N, H, D] with a scalar log-decay g [1, N, H] (--decay);
ring runs softmax attention on the same q, k, v (Hkv = H). Balance: linear attention costs the
same per token, so work = local tokens (1.0 for every layout); softmax work = unmasked
(query, key) pairs, as in bench/cp.py. Writes ``linear_cp.csv`` and ``linear_cp.png`` (time and
bytes against N for the largest world size) into --out.
``time_vs_ideal`` / ``mem_vs_ideal``: time and memory per rank at P over the world-1 value / P
(same strategy, length and mask; 1.0 is perfect 1/P scaling).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bench.cp import make_inputs, pairs_per_query, softmax_reference
from bench.runner import (
    cached_reference,
    device_for,
    gather_stats,
    measure_cell,
    plot_axes,
    run_worlds,
    with_scaling,
    write_outputs,
)
from models.ops.documents import cu_seqlens_from_doc_ids, doc_ids
from models.ops.linear_attention import linear_attention
from parallel.context import CPContext
from parallel.strategies import STRATEGIES, LayerShape, build_strategy


def make_decay(n, h, d, decay, seed=1):
    """(g [1, N, H] or None, gk [1, N, H, D] or None): log-decays of about -0.02 per token."""
    gen = torch.Generator().manual_seed(seed)
    shape = {"scalar": (1, n, h), "key": (1, n, h, d)}.get(decay)
    gate = None if shape is None else F.logsigmoid(torch.randn(*shape, generator=gen) + 4)
    return (gate, None) if decay == "scalar" else (None, gate)


def linear_reference(q, k, v, g, gk, do, cu, chunk):
    """Single-rank op on the whole row: [o, dq, dk, dv, dg or dgk]."""
    n = q.shape[1]
    doc = doc_ids(cu, torch.arange(n))[None]
    inputs = [None if t is None else t.clone().requires_grad_() for t in (q, k, v, g, gk)]
    o = linear_attention(
        *inputs, q.shape[-1] ** -0.5, cu_seqlens=cu_seqlens_from_doc_ids(doc), chunk_size=chunk, impl="chunk"
    )
    torch.autograd.backward(o, do)
    return [o.detach()] + [t.grad for t in inputs if t is not None]


def _run_cell(strat, layout, tensors, cu, rank, world, args, device):
    q, k, v, g, gk, do = tensors
    ctx = CPContext(strat, dist.group.WORLD if world > 1 else None, rank, world, layout, q.shape[1], 1, cu, args.block)
    idx = ctx.local_index
    local = [None if t is None else t[:, idx].to(device).requires_grad_() for t in (q, k, v, g, gk)]
    inputs = dict(zip(("q", "k", "v"), local[:3]))
    options = dict(scale=q.shape[-1] ** -0.5)
    if strat.kind == "linear":
        inputs.update(g=local[3], gk=local[4])
        options.update(chunk_size=args.chunk_size, impl="chunk")
    else:
        options.update(causal=True, window=None)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    t, received, peak, got = measure_cell(
        ctx, strat.kind, inputs, options, do[:, idx].to(device), args.repeats, device, clock
    )
    if strat.kind == "linear":
        work = float(len(idx))
    else:
        qi, frac = strat.work_queries(ctx, q.shape[2], k.shape[2], causal=True, window=None)
        work = float(pairs_per_query(qi, cu, None).sum()) * frac
    return t, received, peak, got, idx, work


def _formula(strat, layout, n, world, args):
    return strat.forward_bytes(
        LayerShape(
            batch=1,
            seq_len=n,
            cp=world,
            n_heads=args.heads,
            n_kv_heads=args.heads,
            head_dim=args.head_dim,
            elem_bytes=4,
            layout=layout,
        )
    )


def bench_rank(rank, world, args):
    torch.set_num_threads(max(1, args.threads // world))
    device = device_for(rank)
    rows = []
    for n in args.seq_lens:
        for mask in args.masks:
            q, k, v, do, cu, _ = make_inputs(n, args.heads, args.heads, args.head_dim, mask)
            g, gk = make_decay(n, args.heads, args.head_dim, args.decay)
            refs = {}
            for spec in args.strategies:
                name, _, layout = spec.partition(":")
                layout = layout or args.layout
                strat = build_strategy(name)
                try:
                    strat.check(n_heads=args.heads, n_kv_heads=args.heads, cp=world, seq_len=n, layout=layout)
                except ValueError:
                    continue
                kind = STRATEGIES[name].kinds[0]
                if kind not in refs:
                    path = os.path.join(args.out, f"linref_{kind}_{n}_{mask}_{args.decay}.pt")
                    if kind == "linear":
                        refs[kind] = cached_reference(
                            path, world, rank, linear_reference, q, k, v, g, gk, do, cu, args.chunk_size
                        )
                    else:
                        refs[kind] = cached_reference(
                            path, world, rank, softmax_reference, q, k, v, do, cu, None, args.block
                        )
                tensors = (q, k, v, g, gk, do) if kind == "linear" else (q, k, v, None, None, do)
                t, recv, peak, got, idx, work = _run_cell(strat, layout, tensors, cu, rank, world, args, device)
                err = max((a.float().cpu() - r[:, idx]).abs().max().item() for a, r in zip(got, refs[kind]))
                s = gather_stats(torch.tensor([t, recv, peak, err, work], dtype=torch.float64), world)
                rows.append(
                    dict(
                        strategy=spec,
                        world_size=world,
                        seq_len=n,
                        mask=mask,
                        fwd_bwd_ms=round(s[:, 0].max().item() * 1e3, 2),
                        bytes_per_rank=int(s[:, 1].max().item()),
                        bytes_formula=int(_formula(strat, layout, n, world, args)),
                        peak_mem_mb=round(s[:, 2].max().item() / 2**20, 2),
                        max_err=float(f"{s[:, 3].max().item():.3g}"),
                        balance=round(s[:, 4].max().item() / s[:, 4].mean().item(), 3),
                    )
                )
    return rows


def plot(rows, path):
    """Time and bytes against sequence length, per strategy, at the largest world size."""
    world = max(r["world_size"] for r in rows)
    masks = sorted({r["mask"] for r in rows})
    fig, axes = plot_axes(len(masks))
    for j, mask in enumerate(masks):
        for name in sorted({r["strategy"] for r in rows}):
            pts = sorted(
                (r["seq_len"], r["fwd_bwd_ms"], r["bytes_per_rank"])
                for r in rows
                if r["strategy"] == name and r["mask"] == mask and r["world_size"] == world
            )
            if not pts:
                continue
            axes[0][j].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
            axes[1][j].plot([p[0] for p in pts], [max(p[2], 1) / 2**10 for p in pts], "o-", label=name)
        axes[0][j].set_title(f"{mask}, P={world}: fwd+bwd ms")
        axes[1][j].set_title(f"{mask}, P={world}: KiB received per rank (fwd)")
        for ax in axes[:, j]:
            ax.set_xlabel("sequence length N")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--masks", nargs="+", default=["causal", "docs"], choices=["causal", "docs"])
    p.add_argument(
        "--strategies", nargs="+", default=["lasp2", "lasp2:zigzag", "lasp1", "ring:zigzag"], help="name[:layout]"
    )
    p.add_argument(
        "--layout",
        default="contiguous",
        choices=["contiguous", "zigzag"],
        help="layout of strategies given without one",
    )
    p.add_argument("--decay", default="scalar", choices=["none", "scalar", "key"])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--block", type=int, default=512, help="softmax kernel block")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: CPU time of each process (a shared machine's wall clock also measures its neighbours)",
    )
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    from bench.plan_calibrate import PREDICTED_COLUMNS, with_predictions
    from bench.runner import COLUMNS

    rows = with_scaling(run_worlds(bench_rank, args.world_sizes, args))
    rows = with_predictions(rows, args.heads, args.heads, args.head_dim, "linear", args.layout)  # the cost model
    write_outputs(rows, args.out, "linear_cp", plot, COLUMNS + PREDICTED_COLUMNS)


if __name__ == "__main__":
    main()
