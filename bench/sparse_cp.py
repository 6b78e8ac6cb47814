"""S2 sparse attention benchmark: dense vs S2 on one device, and the S2-aware CP strategy.

    python -m bench.sparse_cp                                  # CPU defaults (a few minutes)
    python -m bench.sparse_cp --seq-lens 8192 16384 32768 65536 --world 4   # the larger sizes

Times are CPU seconds of each process by default on CPU (--clock wall for the wall clock), one
torch thread per process (--threads).

For each stride and row length N (one document per row, causal, S2 pattern with
``--local`` local blocks of ``--block`` tokens, one offset per KV head):
  * one device: forward + backward time of one attention layer, dense vs S2 (median of
    --repeats), and the FLOP density: score entries the kernel computes for S2 over dense
    (``models.ops.attention.planned_pairs``); the target: S2 time / dense time <= 1.5 x density
    (``target``, ``meets_target``);
  * CP world ``--world`` (real processes, zigzag): the S2-aware strategy ``s2`` -- its time, the
    bytes one rank receives in forward (measured by parallel.comm, max over ranks) and by its
    formula, against the formulas of the dense all-gather (``allgather``, gather=all) and
    ``ring``; max error of o, dq, dk, dv against the one-device S2 result; compute balance (max
    / mean over ranks of active (head, query block, key block) triples) under zigzag and
    contiguous layouts.
Writes ``sparse_cp.csv`` and ``sparse_cp.png`` into --out.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from bench.runner import cached_reference, device_for, gather_stats, measure_cell, plot_axes, run_worlds, write_outputs
from models.ops.attention import MaskSpec, planned_pairs
from models.s2_pattern import s2_pattern
from parallel.context import CPContext
from parallel.strategies import LayerShape, build_strategy
from parallel.strategies.s2 import block_work

COLUMNS = [
    "seq_len",
    "stride",
    "flop_density",
    "dense_ms",
    "s2_ms",
    "s2_over_dense",
    "target",
    "meets_target",
    "world_size",
    "s2_cp_ms",
    "bytes_s2",
    "bytes_s2_formula",
    "bytes_allgather",
    "bytes_ring",
    "s2_over_allgather",
    "max_err",
    "balance_zigzag",
    "balance_contiguous",
]


def _inputs(n, args, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(1, n, args.heads, args.head_dim, generator=g) for _ in range(2))
    k, v = (torch.randn(1, n, args.kv_heads, args.head_dim, generator=g) for _ in range(2))
    return q, k, v, do, torch.tensor([0, n])


def _pattern(stride, args):
    return s2_pattern(
        block=args.block,
        stride=stride,
        local=args.local,
        n_kv_heads=args.kv_heads,
        n_heads=args.heads,
        check_coverage=False,
    )


def _one_device(q, k, v, do, cu, options, args, device):
    """(median seconds of fwd+bwd, [o, dq, dk, dv]) of one layer on one device."""
    ctx = CPContext({}, None, 0, 1, "contiguous", q.shape[1], 1, cu, args.block)  # world 1: the local ops
    inputs = {n: t.to(device).requires_grad_() for n, t in zip("qkv", (q, k, v))}
    kind = "sparse" if "pattern" in options else "softmax"
    t, _, _, got = measure_cell(ctx, kind, inputs, options, do.to(device), args.repeats, device, args.timer)
    return t, got


def bench_rank(rank, world, args):
    torch.set_num_threads(args.threads)
    device = device_for(rank)
    rows = []
    for n in args.seq_lens:
        q, k, v, do, cu = _inputs(n, args)
        if world == 1:
            dense_t, _ = _one_device(q, k, v, do, cu, dict(causal=True), args, device)
        pos = torch.arange(n)
        doc = torch.zeros(1, n, dtype=torch.int64)
        dense_pairs = planned_pairs(MaskSpec(pos, pos, doc, doc, True), args.block, args.heads, args.kv_heads)
        for stride in args.strides:
            pattern = _pattern(stride, args)
            options = dict(causal=True, pattern=pattern)
            row = dict(seq_len=n, stride=stride)
            if world == 1:
                path = os.path.join(args.out, f"ref_s2_{n}_{stride}.pt")
                t, got = _one_device(q, k, v, do, cu, options, args, device)
                torch.save([g.detach().cpu() for g in got], path)
                bound = pattern.bind(cu, 1, n)  # per-document blocks: the batch's document starts
                sparse_pairs = planned_pairs(
                    MaskSpec(pos, pos, doc, doc, True, None, bound), args.block, args.heads, args.kv_heads
                )
                row.update(
                    flop_density=round(sparse_pairs / dense_pairs, 4),
                    dense_ms=round(dense_t * 1e3, 1),
                    s2_ms=round(t * 1e3, 1),
                    s2_over_dense=round(t / dense_t, 3),
                    target=round(1.5 * sparse_pairs / dense_pairs, 3),  # time ratio <= 1.5 x FLOP density
                    meets_target=t / dense_t <= 1.5 * sparse_pairs / dense_pairs,
                )
                rows.append(row)
                continue
            ref = cached_reference(os.path.join(args.out, f"ref_s2_{n}_{stride}.pt"), world, rank, None)
            strat = build_strategy("s2")
            ctx = CPContext(strat, torch.distributed.group.WORLD, rank, world, "zigzag", n, 1, cu, args.block)
            idx = ctx.local_index
            inputs = {name: t[:, idx].to(device).requires_grad_() for name, t in zip("qkv", (q, k, v))}
            t, recv, _, got = measure_cell(
                ctx, "sparse", inputs, options, do[:, idx].to(device), args.repeats, device, args.timer
            )
            err = max((g.float().cpu() - r[:, idx]).abs().max().item() for g, r in zip(got, ref))
            s = gather_stats(torch.tensor([t, recv, err], dtype=torch.float64), world)
            shape = LayerShape(
                batch=1,
                seq_len=n,
                cp=world,
                n_heads=args.heads,
                n_kv_heads=args.kv_heads,
                head_dim=args.head_dim,
                elem_bytes=q.element_size(),
                layout="zigzag",
                pattern=pattern,
            )
            dense_bytes = build_strategy("allgather", gather="all").forward_bytes(shape)
            balance = {}
            for layout in ("zigzag", "contiguous"):
                work = torch.tensor([block_work(n, world, layout, pattern, r, args.kv_heads) for r in range(world)])
                balance[layout] = round(work.max().item() / work.float().mean().item(), 3)
            row.update(
                world_size=world,
                s2_cp_ms=round(s[:, 0].max().item() * 1e3, 1),
                bytes_s2=int(s[:, 1].max().item()),
                bytes_s2_formula=strat.forward_bytes(shape),
                bytes_allgather=dense_bytes,
                bytes_ring=build_strategy("ring").forward_bytes(shape),
                s2_over_allgather=round(s[:, 1].max().item() / dense_bytes, 4),
                max_err=float(f"{s[:, 2].max().item():.3g}"),
                balance_zigzag=balance["zigzag"],
                balance_contiguous=balance["contiguous"],
            )
            rows.append(row)
    return rows


def merge(rows):
    """One row per (seq_len, stride): the one-device columns and the CP columns together."""
    out = {}
    for r in rows:
        out.setdefault((r["seq_len"], r["stride"]), {c: "" for c in COLUMNS}).update(r)
    return [out[key] for key in sorted(out)]


def plot(rows, path):
    fig, axes = plot_axes(2)
    strides = sorted({r["stride"] for r in rows})
    for s in strides:
        sel = sorted((r for r in rows if r["stride"] == s), key=lambda r: r["seq_len"])
        ns = [r["seq_len"] for r in sel]
        axes[0][0].plot(ns, [r["s2_over_dense"] for r in sel], "o-", label=f"time, stride {s}")
        axes[0][0].plot(ns, [r["flop_density"] for r in sel], "x--", label=f"FLOP density, stride {s}")
        if all(r["bytes_s2"] != "" for r in sel):
            axes[0][1].plot(ns, [r["bytes_s2"] / 2**20 for r in sel], "o-", label=f"s2, stride {s}")
            axes[1][0].plot(ns, [r["s2_over_allgather"] for r in sel], "o-", label=f"stride {s}")
            axes[1][1].plot(ns, [r["balance_zigzag"] for r in sel], "o-", label=f"zigzag, stride {s}")
            axes[1][1].plot(ns, [r["balance_contiguous"] for r in sel], "x--", label=f"contiguous, stride {s}")
    first = sorted(
        (r for r in rows if r["stride"] == strides[0] and r["bytes_allgather"] != ""), key=lambda r: r["seq_len"]
    )
    if first:
        ns = [r["seq_len"] for r in first]
        axes[0][1].plot(ns, [r["bytes_allgather"] / 2**20 for r in first], "ks-", label="dense all-gather")
        axes[0][1].plot(ns, [r["bytes_ring"] / 2**20 for r in first], "k^:", label="ring", markerfacecolor="none")
    titles = [
        ["S2 / dense: fwd+bwd time, FLOPs (one device)", "MiB received per rank (fwd)"],
        ["S2 bytes / dense all-gather bytes", "compute balance (max/mean active blocks)"],
    ]
    for i in range(2):
        for j in range(2):
            axes[i][j].set_title(titles[i][j])
            axes[i][j].set_xlabel("N")
            axes[i][j].set_xscale("log", base=2)
            axes[i][j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192])
    p.add_argument("--strides", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--world", type=int, default=2, help="CP world size of the s2 strategy runs")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--block", type=int, default=64, help="S2 block (tokens); also the dense kernel block")
    p.add_argument("--local", type=int, default=1, help="local blocks")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu" if not torch.cuda.is_available() else "wall",
        help="cpu: CPU time of each process (default on CPU: a shared machine's wall clock measures its neighbours)",
    )
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    args.timer = time.process_time if args.clock == "cpu" else time.perf_counter
    rows = merge(run_worlds(bench_rank, [1, args.world], args))
    from bench.plan_calibrate import SPARSE_PREDICTED, predict_sparse

    rows = predict_sparse(rows, args)  # the cost model's times and bytes beside the measured ones
    write_outputs(rows, args.out, "sparse_cp", plot, COLUMNS + SPARSE_PREDICTED)


if __name__ == "__main__":
    main()
