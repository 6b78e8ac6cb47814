"""Context-parallel attention benchmark: strategies x world sizes x lengths x masks.

    python -m bench.cp                                  # CPU defaults: world 1 2 4, N 2048 8192
    python -m bench.cp --world-sizes 2 4 --seq-lens 8192 --masks causal docs --repeats 3
    python -m bench.cp --strategies allgather allgather:regather=false ring   # with options

Each cell runs as real processes (gloo on CPU, NCCL on CUDA) and reports: forward+backward
time of one attention layer (median of repeats), bytes received per rank in the forward
measured by parallel.comm and by the strategy's formula, peak memory per rank, max error
of output and gradients against the single-rank kernel, and compute balance (max/mean over
ranks of unmasked query-key pairs). Writes ``cp.csv`` and ``cp.png`` into --out.

Peak memory: on CUDA, ``max_memory_allocated``; on CPU (no allocator statistics) the bytes of
the tensors the layer keeps for backward, each storage counted once (bench/runner.py): the part
of memory the strategies differ in.
Peers: yunchang's Ulysses and ring forward (its torch attention type, contiguous shards)
run in the same invocation when installed (``pip install --no-deps yunchang``), marked
``peer:``; its CPU path has no backward, so the time is forward only, and its error shows
whether its merges are right. DeepSpeed's Ulysses (``deepspeed.sequence.layer.DistributedAttention``
around our single-device kernel, contiguous shards) runs forward + backward when deepspeed is
installed, as ``peer:deepspeed-ulysses`` (causal rows, heads divisible by the world size).
``time_vs_ideal`` / ``mem_vs_ideal``: time and memory per rank at P over the world-1 value / P
(same strategy, length and mask; 1.0 is perfect 1/P scaling).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from bench.runner import (
    cached_reference,
    deepspeed_ulysses,
    device_for,
    gather_stats,
    measure_cell,
    plot_axes,
    run_worlds,
    with_scaling,
    write_outputs,
)
from models.ops.attention import MaskSpec, attention
from models.ops.documents import doc_ids
from parallel.context import CPContext
from parallel.mesh import build_subgroups
from parallel.strategies import LayerShape, build_strategy, strategy_names


def make_inputs(n, h, hkv, d, mask, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(1, n, h, d, generator=g, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(1, n, hkv, d, generator=g, dtype=dtype) for _ in range(2))
    if mask == "docs":  # packed documents of mixed lengths (1/2, 1/4, 1/8, ... of the row)
        starts, s, length = [0], 0, n // 2
        while s + length < n and length >= 16:
            s += length
            starts.append(s)
            length //= 2
        cu = torch.tensor(starts + [n])
    else:
        cu = torch.tensor([0, n])
    window = n // 8 if mask == "window" else None
    return q, k, v, do, cu, window


def parse_spec(spec: str) -> tuple[str, dict]:
    """(name, options) of a strategy spec NAME or NAME:KEY=VALUE,KEY=VALUE (values read as YAML
    scalars: false, 2, all), e.g. ``allgather:regather=false``."""
    import yaml

    name, _, opts = spec.partition(":")
    pairs = (kv.split("=", 1) for kv in opts.split(",") if kv)
    return name, {key: yaml.safe_load(value) for key, value in pairs}


def pairs_per_query(pos, cu, window):
    """Number of keys each causal query at row positions ``pos`` may see."""
    start = cu[doc_ids(cu, pos)]
    seen = pos - start + 1
    return seen.clamp(max=window) if window else seen


def _run_cell(strategy, q, k, v, do, cu, window, rank, world, layout, block, repeats, device, clock=time.perf_counter):
    group = dist.group.WORLD if world > 1 else None
    sizes = strategy.subgroup_sizes(world, q.shape[2]) if world > 1 else []
    subgroups = build_subgroups(group, world, sizes) if sizes else {}
    ctx = CPContext(strategy, group, rank, world, layout, q.shape[1], 1, cu, block, subgroups)
    idx = ctx.local_index
    inputs = {n: t[:, idx].to(device).requires_grad_() for n, t in zip("qkv", (q, k, v))}
    t, received, peak, got = measure_cell(
        ctx, "softmax", inputs, dict(causal=True, window=window), do[:, idx].to(device), repeats, device, clock
    )
    qi, frac = strategy.work_queries(ctx, q.shape[2], k.shape[2], causal=True, window=window)
    work = float(pairs_per_query(qi, cu, window).sum()) * frac
    return t, received, peak, got, idx, work


def mla_rows(args, n, mask, rank, world, device):
    """MLA layers beside GQA all-gather (``--mla-latent DC``): mla_latent moves the latent c_kv
    and the shared RoPE key, Dc + Dr numbers per token, where GQA all-gather moves 2 * Hkv * D.
    Same heads; q/k width = --head-dim (Dr = --mla-rope-dim of it RoPE), Dv = --head-dim."""
    from models.context import SingleDeviceContext
    from models.mla_attention import local_mla

    h, d, dc, dr = args.heads, args.head_dim, args.mla_latent, args.mla_rope_dim
    g = torch.Generator().manual_seed(1)
    full = {
        "q": torch.randn(1, n, h, d, generator=g),
        "k": torch.randn(1, n, 1, dc, generator=g),  # the latent c_kv
        "v": torch.randn(1, n, 1, dr, generator=g),  # the shared RoPE key
        "kv_b": torch.randn(h * (d - dr + d), dc, generator=g) / dc**0.5,
    }
    do = torch.randn(1, n, h, d, generator=g)
    _, _, _, _, cu, window = make_inputs(n, 1, 1, 1, mask)
    opts = dict(v_head_dim=d, causal=True, window=window, scale=d**-0.5)
    one = SingleDeviceContext(1, n, cu, args.block)
    ref = local_mla(full["q"], full["k"], full["v"], one, kv_b=full["kv_b"], **opts)
    strat = build_strategy("mla_latent", "mla", gather="all")
    group = dist.group.WORLD if world > 1 else None
    ctx = CPContext(strat, group, rank, world, args.layout, n, 1, cu, args.block)
    idx = ctx.local_index
    inputs = {k: (t if k == "kv_b" else t[:, idx]).to(device).requires_grad_() for k, t in full.items()}
    t, recv, peak, got = measure_cell(ctx, "mla", inputs, opts, do[:, idx].to(device), args.repeats, device)
    err = (got[0].float().cpu() - ref[:, idx]).abs().max().item()
    s = gather_stats(torch.tensor([t, recv, peak, err, 1.0], dtype=torch.float64), world)
    shape = LayerShape(1, n, world, h, h, d, elem_bytes=4, layout=args.layout, latent_dim=dc + dr)
    return dict(
        strategy=f"mla_latent(Dc={dc},Dr={dr})",
        world_size=world,
        seq_len=n,
        mask=mask,
        fwd_bwd_ms=round(s[:, 0].max().item() * 1e3, 2),
        bytes_per_rank=int(s[:, 1].max().item()),
        bytes_formula=int(strat.forward_bytes(shape)),
        peak_mem_mb=round(s[:, 2].max().item() / 2**20, 2),
        max_err=float(f"{s[:, 3].max().item():.3g}"),
        balance=1.0,
    )


def softmax_reference(q, k, v, do, cu, window, block):
    """[o, dq, dk, dv] of the single-device kernel on the whole row (what every cell is checked against)."""
    n = q.shape[1]
    pos = torch.arange(n)
    doc = doc_ids(cu, pos)[None]
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    o, _ = attention(q, k, v, MaskSpec(pos, pos, doc, doc, True, window), None, block)
    torch.autograd.backward(o, do)
    return [o.detach(), q.grad, k.grad, v.grad]


def _yunchang_forward(q, k, v, world, rank, idx, repeats, ulysses, ring):
    """Peer: yunchang's LongContextAttention forward (its torch attention type), contiguous
    shards, ulysses x ring degrees as given. Returns (median seconds, output) or (None, why)."""
    try:
        from yunchang import LongContextAttention, set_seq_parallel_pg
        from yunchang.kernels import AttnType

        set_seq_parallel_pg(ulysses, ring, rank, world)
        attn = LongContextAttention(ring_impl_type="basic", attn_type=AttnType.TORCH_MATH)
        rep = q.shape[2] // k.shape[2]
        args = [t[:, idx].contiguous() for t in (q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2))]
        with torch.no_grad():
            out = attn(*args, causal=True)
            times = []
            for _ in range(repeats):
                dist.barrier()
                t0 = time.perf_counter()
                out = attn(*args, causal=True)
                times.append(time.perf_counter() - t0)
    except Exception as e:  # not installed, or fails on this machine: report, don't stop
        return None, f"{type(e).__name__}: {e}"
    return statistics.median(times), out


def _deepspeed_ulysses(q, k, v, do, ref, world, idx, repeats, block):
    """Peer: DeepSpeed's Ulysses around our single-device causal kernel (bench.runner)."""
    n = q.shape[1]

    def local_attn(ql, kl, vl):  # the whole sequence, H / world heads
        pos = torch.arange(n, device=ql.device)
        doc = torch.zeros(1, n, dtype=torch.long, device=ql.device)
        return attention(ql, kl, vl, MaskSpec(pos, pos, doc, doc, True, None), None, block)[0]

    return deepspeed_ulysses(local_attn, q, k, v, do, ref, world, idx, repeats)


def bench_rank(rank, world, args):
    torch.set_num_threads(max(1, args.threads // world))
    device = device_for(rank)
    rows = []
    for n in args.seq_lens:
        for mask in args.masks:
            q, k, v, do, cu, window = make_inputs(n, args.heads, args.kv_heads, args.head_dim, mask)
            ref = cached_reference(
                os.path.join(args.out, f"ref_{n}_{mask}.pt"),
                world,
                rank,
                softmax_reference,
                q,
                k,
                v,
                do,
                cu,
                window,
                args.block,
            )
            for name in args.strategies:
                base, options = parse_spec(name)
                strat = build_strategy(base, **options)
                try:
                    strat.check(n_heads=args.heads, n_kv_heads=args.kv_heads, cp=world, seq_len=n, layout=args.layout)
                except ValueError:
                    continue
                clock = time.process_time if args.clock == "cpu" else time.perf_counter
                t, recv, peak, got, idx, work = _run_cell(
                    strat, q, k, v, do, cu, window, rank, world, args.layout, args.block, args.repeats, device, clock
                )
                err = max((g.float().cpu() - r[:, idx]).abs().max().item() for g, r in zip(got, ref))
                s = gather_stats(torch.tensor([t, recv, peak, err, work], dtype=torch.float64), world)
                shape = LayerShape(
                    batch=1,
                    seq_len=n,
                    cp=world,
                    n_heads=args.heads,
                    n_kv_heads=args.kv_heads,
                    head_dim=args.head_dim,
                    elem_bytes=q.element_size(),
                    layout=args.layout,
                )
                # plan-dependent strategies (cad) give the exact count of this batch's plan
                plan_bytes = getattr(strat, "forward_bytes_of", None)
                formula = plan_bytes(shape, cu, window=window) if plan_bytes else strat.forward_bytes(shape)
                rows.append(
                    dict(
                        strategy=name,
                        world_size=world,
                        seq_len=n,
                        mask=mask,
                        fwd_bwd_ms=round(s[:, 0].max().item() * 1e3, 2),
                        bytes_per_rank=int(s[:, 1].max().item()),
                        bytes_formula=int(formula),
                        peak_mem_mb=round(s[:, 2].max().item() / 2**20, 2),
                        max_err=float(f"{s[:, 3].max().item():.3g}"),
                        balance=round(s[:, 4].max().item() / s[:, 4].mean().item(), 3),
                    )
                )
            if args.mla_latent:
                rows.append(mla_rows(args, n, mask, rank, world, device))
            if args.peers and mask == "causal" and world > 1:
                idx = CPContext(build_strategy("allgather"), None, rank, world, "contiguous", n, 1, cu).local_index
                for label, u, r in (("ulysses", world, 1), ("ring", 1, world)):
                    if args.heads % u:
                        continue
                    t, out = _yunchang_forward(q, k, v, world, rank, idx, args.repeats, u, r)
                    ok = torch.tensor([float(t is not None)])
                    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
                    if not ok.item():
                        if rank == 0:
                            print(f"[bench.cp] peer yunchang-{label} skipped: {out}")
                        continue
                    err = (out.float() - ref[0][:, idx]).abs().max().item()
                    s = torch.tensor([t, err], dtype=torch.float64)
                    dist.all_reduce(s, op=dist.ReduceOp.MAX)
                    rows.append(_peer_row(f"peer:yunchang-{label}(fwd only)", world, n, mask, s))
                if args.heads % world == 0:
                    t, err = _deepspeed_ulysses(q, k, v, do, ref, world, idx, args.repeats, args.block)
                    ok = torch.tensor([float(t is not None)])
                    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
                    if not ok.item():
                        if rank == 0:
                            print(f"[bench.cp] peer deepspeed-ulysses skipped: {err}")
                        continue
                    s = torch.tensor([t, err], dtype=torch.float64)
                    dist.all_reduce(s, op=dist.ReduceOp.MAX)
                    rows.append(_peer_row("peer:deepspeed-ulysses", world, n, mask, s))
    return rows


def _peer_row(label: str, world: int, n: int, mask: str, s: torch.Tensor) -> dict:
    """A peer's row: s = [seconds, max error] (max over ranks); bytes, memory and balance are
    not measured for peers."""
    return dict(
        strategy=label,
        world_size=world,
        seq_len=n,
        mask=mask,
        fwd_bwd_ms=round(s[0].item() * 1e3, 2),
        bytes_per_rank="",
        bytes_formula="",
        peak_mem_mb="",
        max_err=float(f"{s[1].item():.3g}"),
        balance="",
    )


def plot(rows, path):
    masks = sorted({r["mask"] for r in rows})
    fig, axes = plot_axes(len(masks))
    for j, mask in enumerate(masks):
        for name in sorted({r["strategy"] for r in rows}):
            sel = [r for r in rows if r["strategy"] == name and r["mask"] == mask and r["world_size"] > 1]
            n_max = max((r["seq_len"] for r in sel), default=None)
            pts = sorted((r["world_size"], r["fwd_bwd_ms"], r["bytes_per_rank"]) for r in sel if r["seq_len"] == n_max)
            if not pts:
                continue
            axes[0][j].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
            if pts[0][2] != "":
                axes[1][j].plot([p[0] for p in pts], [p[2] / 2**20 for p in pts], "o-", label=name)
        axes[0][j].set_title(f"{mask}: fwd+bwd ms (longest N)")
        axes[1][j].set_title(f"{mask}: MiB received per rank (fwd)")
        for ax in axes[:, j]:
            ax.set_xlabel("world size")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--masks", nargs="+", default=["causal", "docs", "window"], choices=["causal", "docs", "window"])
    p.add_argument(
        "--strategies",
        nargs="+",
        default=None,
        help="default: every registered one; NAME:KEY=VALUE,... passes options, e.g. allgather:regather=false",
    )
    p.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag"])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--mla-latent", type=int, default=0, help="also run mla_latent with this latent width Dc")
    p.add_argument("--mla-rope-dim", type=int, default=16, help="its shared RoPE key width Dr")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-peers", dest="peers", action="store_false")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: CPU time of each process")
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    args.strategies = args.strategies or [s for s in strategy_names("softmax") if s != "local"]
    from bench.plan_calibrate import PREDICTED_COLUMNS, with_predictions
    from bench.runner import COLUMNS

    rows = with_scaling(run_worlds(bench_rank, args.world_sizes, args))
    rows = with_predictions(rows, args.heads, args.kv_heads, args.head_dim, layout=args.layout)  # the cost model
    write_outputs(rows, args.out, "cp", plot, COLUMNS + PREDICTED_COLUMNS)


if __name__ == "__main__":
    main()
