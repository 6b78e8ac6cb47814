"""CAD ping-pong: how much of the all-to-all time the second nano-batch hides.

    python -m bench.cad_overlap                          # world 4, docs mask, N = 8192
    python -m bench.cad_overlap --world 2 --seq-len 4096 --repeats 5

Runs the ``cad`` strategy on real processes (gloo on CPU, NCCL on CUDA) without and with
``ping_pong`` on bench.cp's mixed-length documents, and reports per forward + backward (median
over repeats, slowest rank): the wall time, the kernel time, and the *exposed* communication
time (time blocked in ``wait()`` on an all-to-all; the rest of the communication ran while a
kernel computed). On CUDA the strategy synchronises the device around each timed region
(``timing["cuda_sync"]``): NCCL's ``wait()`` and the kernels return as soon as they are queued.
Overlap = 1 - exposed(ping-pong) / exposed(no ping-pong).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.distributed as dist

from bench.cp import make_inputs
from bench.runner import device_for, print_table, timed_repeats
from parallel.context import CPContext
from parallel.spawn import run_distributed
from parallel.strategies import build_strategy

COLUMNS = ["ping_pong", "world_size", "seq_len", "fwd_bwd_ms", "kernel_ms", "exposed_comm_ms", "balance"]


def _measure(strat, ctx, leaves, do, repeats, device):
    """(median fwd+bwd s, median kernel s, median exposed wait s) of one strategy here."""
    per_step = []

    def step():
        strat.timing.update(wait_s=0.0, compute_s=0.0)  # cuda_sync stays
        o = ctx.attention(*leaves, causal=True)
        torch.autograd.backward(o, do)
        per_step.append(dict(strat.timing))
        return o

    times, _ = timed_repeats(step, leaves, repeats, device, ctx.world_size)
    kernel = statistics.median(s["compute_s"] for s in per_step[1:])
    return statistics.median(times), kernel, statistics.median(s["wait_s"] for s in per_step[1:])


def _rank(rank, world, args):
    torch.set_num_threads(max(1, args.threads // world))
    device = device_for(rank)
    q, k, v, do, cu, _ = make_inputs(args.seq_len, args.heads, args.kv_heads, args.head_dim, "docs")
    rows = []
    for ping_pong in (False, True):
        strat = build_strategy("cad", ping_pong=ping_pong)
        strat.timing["cuda_sync"] = True  # on NCCL, wait() and kernels return once launched
        ctx = CPContext(strat, dist.group.WORLD, rank, world, args.layout, args.seq_len, 1, cu, args.block)
        idx = ctx.local_index
        leaves = [t[:, idx].to(device).requires_grad_() for t in (q, k, v)]
        stats = torch.tensor(_measure(strat, ctx, leaves, do[:, idx].to(device), args.repeats, device))
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        rows.append(
            dict(
                ping_pong=ping_pong,
                world_size=world,
                seq_len=args.seq_len,
                fwd_bwd_ms=round(stats[0].item() * 1e3, 1),
                kernel_ms=round(stats[1].item() * 1e3, 1),
                exposed_comm_ms=round(stats[2].item() * 1e3, 1),
                balance=round(strat.plan(ctx, True, None, args.heads, 2 * args.kv_heads).balance(), 3),
            )
        )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag"])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=4)
    args = p.parse_args(argv)
    rows = run_distributed(_rank, args.world, args, timeout=3600, backend="auto")[0]
    print_table(rows, COLUMNS)
    off, on = rows[0]["exposed_comm_ms"], rows[1]["exposed_comm_ms"]
    if off > 0:
        print(f"overlap: ping-pong hides {100 * (1 - on / off):.0f}% of the exposed all-to-all time")


if __name__ == "__main__":
    main()
