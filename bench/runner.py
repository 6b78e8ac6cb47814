"""What the CP benchmarks share: spawning each world size, timing, byte and memory counts,
the CSV / table / plot outputs.

    rows = run_worlds(bench_rank, world_sizes, args)     # bench_rank(rank, world, args) -> rows
    write_outputs(rows, args.out, "cp", plot)             # <out>/cp.csv, <out>/cp.png, a table

``measure_cell`` runs one strategy on one rank: forward + backward of ``ctx.run(kind, ...)``
timed over repeats (median), then one more forward counting the bytes this rank receives
(``parallel.comm``) and its peak memory: on CUDA ``max_memory_allocated``; on CPU (no
allocator statistics) the bytes of the tensors the layer keeps for backward, each storage
counted once (saved-tensor hooks), which is the part of memory the strategies differ in.
``peak_allocated_bytes`` is the CPU analogue of CUDA's peak (bench.train_step).
"""

from __future__ import annotations

import csv
import os
import statistics
import time

import torch
import torch.distributed as dist

from parallel import comm
from parallel.activation_trace import saved_storage_bytes  # noqa: F401  (the benchmarks import it from here)
from parallel.spawn import run_distributed

COLUMNS = [
    "strategy",
    "world_size",
    "seq_len",
    "mask",
    "fwd_bwd_ms",
    "bytes_per_rank",
    "bytes_formula",
    "peak_mem_mb",
    "max_err",
    "balance",
    "time_vs_ideal",
    "mem_vs_ideal",
]


def deepspeed_ulysses(local_attn, q, k, v, do, ref, world, idx, repeats):
    """Peer: DeepSpeed's Ulysses (deepspeed.sequence.layer.DistributedAttention: all-to-all of
    q, k, v and the output over the world) around ``local_attn(q, k, v) -> o`` (the whole
    sequence, H / world heads: [B, N, H/P, D]), contiguous shards ``idx``,
    forward + backward. Returns (median seconds, max error of output and gradients against the
    single-rank reference ``ref``) or (None, why)."""
    try:
        import deepspeed.comm as ds_dist
        from deepspeed.sequence.layer import DistributedAttention

        from trainer.engines.deepspeed import guard_jit_builds

        guard_jit_builds(allow=False)  # never a JIT build of DeepSpeed's CPU comm op
        if not ds_dist.is_initialized():
            ds_dist.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        rep = q.shape[2] // k.shape[2]
        kv_rep = rep if k.shape[2] % world else 1  # fewer KV heads than ranks: replicate them
        attn = DistributedAttention(local_attn, dist.group.WORLD, scatter_idx=2, gather_idx=1)
        leaves = [t[:, idx].contiguous().requires_grad_() for t in (q, k, v)]
        times = []
        for _ in range(repeats + 1):
            for t in leaves:
                t.grad = None
            dist.barrier()
            t0 = time.perf_counter()
            kk, vv = (t.repeat_interleave(kv_rep, 2) for t in leaves[1:])
            out = attn(leaves[0], kk, vv, 0)
            torch.autograd.backward(out, do[:, idx])
            times.append(time.perf_counter() - t0)
        got = [out.detach(), *(t.grad for t in leaves)]
        err = max((g.float() - r[:, idx]).abs().max().item() for g, r in zip(got, ref))
    except Exception as e:  # not installed, or fails on this machine: report, don't stop
        return None, f"{type(e).__name__}: {e}"
    return statistics.median(times[1:]), err


def timed_repeats(step, leaves, repeats, device, world, clock=time.perf_counter):
    """Warm up once, then time ``step()`` (forward + backward) ``repeats`` times, clearing
    the gradients of ``leaves`` before each run. Returns (seconds list, last output).
    ``clock``: wall time by default; ``time.process_time`` (CPU time of this process) on a
    shared CPU, where the wall clock also measures the neighbours."""
    step()
    times = []
    for _ in range(repeats):
        for t in leaves:
            t.grad = None
        if world > 1:
            dist.barrier()
        t0 = clock()
        o = step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(clock() - t0)
    return times, o


def peak_allocated_bytes(fn, device: torch.device) -> int:
    """Peak bytes of tensor memory allocated above the level at the start while ``fn()`` runs.
    CUDA: ``max_memory_allocated``. CPU (no allocator statistics): every allocation and free of
    the CPU allocator as torch.profiler records them (``profile_memory=True``), summed in
    order -- the same quantity. A block allocated before the start and freed inside is not
    seen (the profiler does not know its size): free such tensors first (e.g. gradients)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    now = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        now += e.nbytes()
        peak = max(peak, now)
    return peak


def measure_cell(ctx, kind, inputs: dict, options: dict, do, repeats, device, clock=time.perf_counter):
    """One strategy on this rank. inputs: local leaves by name, "q", "k", "v" and the kind's
    optional tensors ("g", "gk"; None when absent), already on ``device``. Returns (median
    seconds of forward + backward, bytes received in one forward, peak bytes, [o, grads of
    the non-None inputs in order])."""
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    extra = {n: t for n, t in inputs.items() if n not in ("q", "k", "v")}
    live = [t for t in inputs.values() if t is not None]

    def forward():
        return ctx.run(kind, q, k, v, **extra, **options)

    def step():
        o = forward()
        torch.autograd.backward(o, do)
        return o

    times, o = timed_repeats(step, live, repeats, device, ctx.world_size, clock)
    comm.COUNTER.reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    box, hooks = saved_storage_bytes()
    with hooks:
        o2 = forward()
    received = comm.COUNTER.total_received
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else box["bytes"]
    del o2
    return statistics.median(times), received, peak, [o.detach()] + [t.grad for t in live]


def gather_stats(stats: torch.Tensor, world: int) -> torch.Tensor:
    """[k] per rank -> [world, k] on every rank."""
    if world == 1:
        return stats[None]
    out = [torch.zeros_like(stats) for _ in range(world)]
    dist.all_gather(out, stats)
    return torch.stack(out)


def cached_reference(path, world, rank, compute, *args):
    """The single-rank reference ``compute(*args)``, computed at world 1 and reused by the
    larger worlds."""
    if world > 1 and os.path.exists(path):
        return torch.load(path)
    ref = compute(*args)
    if world == 1 and rank == 0:
        torch.save(ref, path)
    return ref


def device_for(rank: int) -> torch.device:
    """This rank's device: cuda:rank under NCCL (run_distributed made it current), else the CPU."""
    nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    return torch.device("cuda", rank) if nccl else torch.device("cpu")


def run_worlds(bench_rank, world_sizes, args) -> list[dict]:
    """bench_rank(rank, world, args) on real processes for each world size (ascending, so the
    world-1 references are cached first); rank 0's rows of every world."""
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for world in sorted(world_sizes):
        rows += run_distributed(bench_rank, world, args, timeout=3600, backend="auto")[0]
    return rows


def with_scaling(rows: list[dict]) -> list[dict]:
    """Adds ``time_vs_ideal`` = time at P / (time at 1 / P) and ``mem_vs_ideal`` = memory per rank
    at P / (memory at 1 / P) against the same strategy, length and mask at world 1 (1.0: perfect
    1/P scaling; empty without a world-1 row)."""
    one = {(r["strategy"], r["seq_len"], r["mask"]): r for r in rows if r["world_size"] == 1}
    for r in rows:
        base, p = one.get((r["strategy"], r["seq_len"], r["mask"])), r["world_size"]
        ok = base is not None and base["fwd_bwd_ms"] and base["peak_mem_mb"]
        r["time_vs_ideal"] = round(r["fwd_bwd_ms"] * p / base["fwd_bwd_ms"], 3) if ok else ""
        r["mem_vs_ideal"] = round(r["peak_mem_mb"] * p / base["peak_mem_mb"], 3) if ok else ""
    return rows


def print_table(rows, columns=COLUMNS):
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print(" ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print(" ".join(str(r[c]).ljust(widths[c]) for c in columns))


def write_outputs(rows, out: str, name: str, plot, columns=COLUMNS) -> None:
    """<out>/<name>.csv, <out>/<name>.png (``plot(rows, path)``) and the table on stdout."""
    with open(os.path.join(out, f"{name}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    plot(rows, os.path.join(out, f"{name}.png"))
    print_table(rows, columns)
    print(f"wrote {out}/{name}.csv and {out}/{name}.png")


def plot_axes(n_cols: int):
    """A 2 x n_cols figure with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, n_cols, figsize=(5 * n_cols, 8), squeeze=False)
    return fig, axes
