"""Mask families x lengths x CP strategies (the LongCA-bench matrix, on this machine).

    python -m bench.masks                                   # CPU defaults: N 1024, world 1 2 4
    python -m bench.masks --seq-lens 2048 4096 --world-sizes 2 4 --repeats 3

Every mask is a ``SliceMask`` (models/ops/attention/slices.py) passed to ``ctx.run("softmax",
..., mask=...)``. Each cell (mask, N, strategy, world) runs one attention layer as real gloo
processes and reports: forward+backward time (median of repeats), bytes received per rank in
the forward measured by ``parallel.comm`` (max over ranks) and by the strategy's formula for
the mask (allgather: the chunks its need matrix names; CAD: its plan; the others: their fixed
formula), compute balance (max / mean over ranks of the (head, query, key) pairs the mask
allows for the work each rank does), the mask's density (allowed (head, query, key) triples / (H N^2)) and the
max error of output and gradients against the single-device kernel. Peers: at world 1 SDPA with
the dense boolean mask (``peer:sdpa_mask``: every mask, N^2 work) and FlexAttention's forward
(``peer:flex(fwd only)``: torch has no FlexAttention backward on CPU); at every world > 1
DeepSpeed's Ulysses around the single-device kernel (``peer:deepspeed-ulysses``, contiguous
shards; masks that do not differ per head). Peer rows count no bytes (0).
Writes ``masks.csv`` and ``masks.png`` (heatmaps of time and balance at the largest world and
length) into --out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from bench.runner import deepspeed_ulysses, gather_stats, measure_cell, plot_axes, run_worlds, write_outputs
from models.ops.attention import slices as S
from parallel.cad_plan import plan_cad
from parallel.context import CPContext
from parallel.mesh import build_subgroups
from parallel.sharding import local_index
from parallel.strategies import LayerShape, build_strategy

COLUMNS = [
    "mask",
    "seq_len",
    "strategy",
    "world",
    "density",
    "time_s",
    "bytes_max",
    "bytes_formula",
    "balance",
    "max_err",
]
STRATEGIES = {"allgather": {}, "ring": {}, "ulysses": {}, "usp": {}, "cad": {"min_shard": 32}}


def masks(n: int, heads: int) -> dict:
    """The benchmark's masks at row length n (LongCA-bench / MagiAttention families)."""
    q = n // 8
    docs = [n // 2, n // 4, n // 8, n - n // 2 - n // 4 - n // 8]
    return {
        "full": S.full(n),
        "causal": S.causal(n),
        "varlen_causal": S.varlen_causal(docs),
        "sliding_window": S.sliding_window(n, n // 8),
        "prefix_lm": S.prefix_lm(n, n // 4),
        "shared_question": S.shared_question(q, [(n - q) // 4] * 3 + [n - q - 3 * ((n - q) // 4)]),
        "causal_blockwise": S.causal_blockwise(n, n // 8),
        "block_causal": S.block_causal(n, n // 16),
        "global_sliding_window": S.global_sliding_window(n, 4, n // 8),
        "longlora": S.longlora(n, n // 4, heads),
        "sinklora": S.sinklora(n, n // 4, heads, 4),
    }


def per_head_query(mask, n: int, heads: int) -> torch.Tensor:
    """[H, N] allowed keys per (head, query)."""
    return S.dense(mask.row(0), torch.arange(n), torch.arange(n), heads).sum(-1)


def rank_loads(name, strat, mask, n, heads, world, layout) -> list[int]:
    """Allowed pairs each rank computes (the work a strategy places there)."""
    cnt = per_head_query(mask, n, heads)
    if world == 1:
        return [int(cnt.sum())]
    if name == "cad":
        return plan_cad(
            None,
            1,
            n,
            world,
            layout,
            min_shard=strat.min_shard,
            tolerance=strat.tolerance,
            qrow_bytes=heads,
            kvrow_bytes=heads,
            mask=mask,
            n_heads=heads,
        ).load
    if name == "ulysses":
        hq = heads // world
        return [int(cnt[r * hq : (r + 1) * hq].sum()) for r in range(world)]
    if name == "usp":
        u = strat.degree(world, heads)
        hq, loads = heads // u, []
        for r in range(world):
            g, slot = r // u, r % u
            qs = torch.cat([local_index(n, c, world, layout) for c in range(g * u, (g + 1) * u)])
            loads.append(int(cnt[slot * hq : (slot + 1) * hq][:, qs].sum()))
        return loads
    return [int(cnt[:, local_index(n, r, world, layout)].sum()) for r in range(world)]


def bench_rank(rank, world, args):
    group = dist.group.WORLD if world > 1 else None
    torch.set_num_threads(max(1, args.threads // world))
    rows = []
    for n in args.seq_lens:
        g = torch.Generator().manual_seed(0)
        q, do = (torch.randn(1, n, args.heads, args.head_dim, generator=g) for _ in range(2))
        k, v = (torch.randn(1, n, args.kv_heads, args.head_dim, generator=g) for _ in range(2))
        cu = torch.tensor([0, n])
        for mname, mask in masks(n, args.heads).items():
            ref = _reference(q, k, v, do, mask, n, args)
            density = mask.area(0, args.heads) / (args.heads * n * n)  # per-head slices count once per head
            names = ["local"] if world == 1 else [s for s in args.strategies if s in STRATEGIES]
            for name in names:
                strat = build_strategy(name, **STRATEGIES.get(name, {}))
                sizes = strat.subgroup_sizes(world, args.heads) if world > 1 else []
                subgroups = build_subgroups(group, world, sizes) if sizes else {}
                ctx = CPContext(strat, group, rank, world, args.layout, n, 1, cu, args.block, subgroups)
                idx = ctx.local_index
                leaves = {x: t[:, idx].clone().requires_grad_() for x, t in (("q", q), ("k", k), ("v", v))}
                secs, got_bytes, _, outs = measure_cell(
                    ctx, "softmax", leaves, {"mask": mask}, do[:, idx], args.repeats, torch.device("cpu")
                )
                err = max((a - r[:, idx]).abs().max().item() for a, r in zip(outs, ref))
                formula = _formula(name, strat, ctx, mask, n, args, world)
                stats = gather_stats(
                    torch.tensor([secs, float(got_bytes), float(formula), err], dtype=torch.float64), world
                )
                loads = rank_loads(name, strat, mask, n, args.heads, world, args.layout)
                rows.append(
                    dict(
                        mask=mname,
                        seq_len=n,
                        strategy=name,
                        world=world,
                        density=round(density, 4),
                        time_s=round(float(stats[:, 0].max()), 4),
                        bytes_max=int(stats[:, 1].max()),
                        bytes_formula=int(stats[:, 2].max()),
                        balance=round(max(loads) / (sum(loads) / len(loads)), 3),
                        max_err=float(stats[:, 3].max()),
                    )
                )
            if world == 1 and n <= args.dense_max_len:
                rows.append(_sdpa_row(q, k, v, do, mask, mname, n, density, ref, args))
                rows.append(_flex_row(q, k, v, mask, mname, n, density, ref, args))
            per_head = any(sl.heads is not None for sl in mask.row(0))
            if world > 1 and args.heads % world == 0 and not per_head:
                row = _ds_ulysses_row(q, k, v, do, mask, mname, n, density, ref, rank, world, args)
                rows += [row] if row else []
    return rows


def _reference(q, k, v, do, mask, n, args):
    """Single-device kernel output and gradients (the reference every cell is compared to)."""
    from models.context import SingleDeviceContext

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = SingleDeviceContext(1, n, None, args.block).run("softmax", *leaves, mask=mask)
    o.backward(do)
    return [o.detach()] + [t.grad for t in leaves]


def _formula(name, strat, ctx, mask, n, args, world) -> int:
    if world == 1:
        return 0
    shape = LayerShape(
        batch=1,
        seq_len=n,
        cp=world,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        layout=args.layout,
    )
    if name == "allgather":
        return max(strat.needed_bytes(_at(ctx, r), shape, mask) for r in range(world))
    if name == "cad":
        return max(
            strat.plan_bytes(_at(ctx, r), args.heads, args.kv_heads, args.head_dim, 4, mask=mask) for r in range(world)
        )
    return strat.forward_bytes(shape)


def _at(ctx, rank):
    """The same context as rank ``rank`` sees it (formulas are computed without communication)."""
    return CPContext(
        ctx.strategies,
        None,
        rank,
        ctx.world_size,
        ctx.layout,
        ctx.seq_len,
        ctx.batch_size,
        ctx.cu_seqlens,
        ctx.block,
        ctx.subgroups,
    )


def _sdpa_row(q, k, v, do, mask, mname, n, density, ref, args):
    """SDPA with the dense [H, N, N] boolean mask: supports any mask, computes N^2."""
    allowed = S.dense(mask.row(0), torch.arange(n), torch.arange(n), args.heads)[None]
    rep = args.heads // args.kv_heads
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    times = []
    for _ in range(args.repeats + 1):
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        qh, kh, vh = (x.transpose(1, 2) for x in leaves)
        kh, vh = kh.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1)
        o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed).transpose(1, 2)
        o = torch.nan_to_num(o)  # rows that see no key: SDPA gives NaN
        o.backward(do)
        times.append(time.perf_counter() - t0)
    err = max((a - r).abs().max().item() for a, r in zip([o.detach()] + [t.grad for t in leaves], ref))
    return _peer_row(mname, n, "peer:sdpa_mask", 1, density, statistics.median(times[1:]), err)


def _flex_row(q, k, v, mask, mname, n, density, ref, args):
    """FlexAttention, forward only (no CPU backward in torch): a block mask from the dense
    [H, N, N] boolean mask, eager (the compiled path is CUDA's)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    allowed = S.dense(mask.row(0), torch.arange(n), torch.arange(n), args.heads)
    block_mask = create_block_mask(lambda b, h, qi, ki: allowed[h, qi, ki], 1, args.heads, n, n, device="cpu")
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    times = []
    with torch.no_grad():
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            o = flex_attention(qh, kh, vh, block_mask=block_mask, enable_gqa=True).transpose(1, 2)
            times.append(time.perf_counter() - t0)
    err = (o - ref[0]).abs().max().item()
    return _peer_row(mname, n, "peer:flex(fwd only)", 1, density, statistics.median(times[1:]), err)


def _ds_ulysses_row(q, k, v, do, mask, mname, n, density, ref, rank, world, args):
    """DeepSpeed's Ulysses around the single-device kernel with the mask (head-independent
    masks: DeepSpeed's local attention does not know which heads it holds)."""
    from models.context import SingleDeviceContext

    def local_attn(ql, kl, vl):
        return SingleDeviceContext(1, n, None, args.block).run("softmax", ql, kl, vl, mask=mask)

    idx = local_index(n, rank, world, "contiguous")
    t, err = deepspeed_ulysses(local_attn, q, k, v, do, ref, world, idx, args.repeats)
    ok = torch.tensor([float(t is not None)])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not ok.item():
        if rank == 0:
            print(f"[bench.masks] peer deepspeed-ulysses skipped: {err}")
        return None
    s = gather_stats(torch.tensor([t, err], dtype=torch.float64), world)
    return _peer_row(mname, n, "peer:deepspeed-ulysses", world, density, float(s[:, 0].max()), float(s[:, 1].max()))


def _peer_row(mname, n, strategy, world, density, seconds, err) -> dict:
    """A peer's CSV row (peers count no bytes and are not balanced: one device or whole heads)."""
    return dict(
        mask=mname,
        seq_len=n,
        strategy=strategy,
        world=world,
        density=round(density, 4),
        time_s=round(seconds, 4),
        bytes_max=0,
        bytes_formula=0,
        balance=1.0,
        max_err=err,
    )


def plot(rows, path):
    world, n = max(r["world"] for r in rows), max(r["seq_len"] for r in rows)
    cells = [r for r in rows if r["world"] == world and r["seq_len"] == n]
    mask_names = sorted({r["mask"] for r in cells})
    strat_names = sorted({r["strategy"] for r in cells})
    fig, axes = plot_axes(1)
    for ax, key in zip(axes[:, 0], ("time_s", "balance")):
        grid = torch.full((len(mask_names), len(strat_names)), float("nan"))
        for r in cells:
            grid[mask_names.index(r["mask"]), strat_names.index(r["strategy"])] = float(r[key])
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(strat_names)), strat_names, rotation=30)
        ax.set_yticks(range(len(mask_names)), mask_names)
        ax.set_title(f"{key} (world {world}, N {n})")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    p.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag"])
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dense-max-len", type=int, default=4096, help="longest N for the SDPA dense-mask peer")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    rows = run_worlds(bench_rank, args.world_sizes, args)
    write_outputs(rows, args.out, "masks", plot, COLUMNS)


if __name__ == "__main__":
    main()
