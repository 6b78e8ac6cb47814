"""CAD planner at scale, no processes: balance and bytes of the plan for synthetic document mixes.

    python -m bench.cad_sim                                   # 8..512 ranks, 128K and 512K tokens per rank
    python -m bench.cad_sim --ranks 8 64 --tokens-per-rank 131072 --mixes lognormal

For each document-length mix, world size P and tokens per rank T, one row of P * T tokens is
filled with documents drawn from the mix (fixed seed) and planned (parallel/cad_plan.py,
zigzag layout). Reports the attention balance (max / mean causal pairs over ranks) of the
zigzag placement, which ring and all-gather compute in, and of the CAD plan; the bytes one rank
receives per layer forward (max over ranks) for CAD, ring ((P - 1) * 2 * T * Hkv * D * e) and
all-gather under zigzag (``gather="needed"``: only the chunks of ranks sharing a document);
the memory balance of the plan (max / mean of bytes held for attention) and the planner's
time. Writes ``cad_sim.csv`` and ``cad_sim.png`` into --out.

Mixes (lengths in tokens, synthetic; not the statistics of any real corpus):
    prolong    long-tailed, in the spirit of ProLong's 64K training mix: 10% of documents
               log-uniform in [8K, 64K], the rest lognormal around 1K
    lognormal  lognormal, median ~3K, sigma 1.5
    one_huge   one document of a quarter of the row among lognormal documents around 400
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time

import torch

from bench.runner import plot_axes, write_outputs
from parallel.cad_plan import owner_runs, plan_cad

COLUMNS = [
    "mix",
    "ranks",
    "tokens_per_rank",
    "docs",
    "balance_zigzag",
    "balance_cad",
    "memory_balance_cad",
    "mib_per_rank_cad",
    "mib_per_rank_ring",
    "mib_per_rank_allgather",
    "plan_s",
]


def doc_lengths(mix: str, total: int, seed: int = 0) -> list[int]:
    """Document lengths filling ``total`` tokens (the last one cut to fit)."""
    rng = random.Random(seed)
    out: list[int] = [total // 4] if mix == "one_huge" else []
    filled = sum(out)
    while filled < total:
        if mix == "prolong":
            if rng.random() < 0.1:
                length = int(math.exp(rng.uniform(math.log(8192), math.log(65536))))
            else:
                length = int(rng.lognormvariate(math.log(1024), 1.0))
        elif mix == "lognormal":
            length = int(rng.lognormvariate(math.log(3000), 1.5))
        else:
            length = int(rng.lognormvariate(math.log(400), 1.0))
        out.append(max(1, min(length, total - filled)))
        filled += out[-1]
    rng.shuffle(out)
    return out


def allgather_needed_bytes(cu: torch.Tensor, n: int, ranks: int, chunk_bytes: int) -> int:
    """The most bytes a rank receives under all-gather ``gather="needed"`` (zigzag, causal):
    the K/V chunk of every other rank holding a key in the causal prefix of a document that
    one of its runs touches (parallel/strategies/allgather.py's need matrix, by intervals)."""
    runs = owner_runs(n, ranks, "zigzag")
    grid = sorted((a, b, r) for r, rr in enumerate(runs) for a, b in rr)
    size = grid[0][1] - grid[0][0]
    worst = 0
    for r in range(ranks):
        need = set()
        for a, b in runs[r]:
            first = int(cu[torch.searchsorted(cu, torch.tensor(a), right=True) - 1])  # doc start of a
            need |= {grid[ch][2] for ch in range(first // size, (b - 1) // size + 1)}
        worst = max(worst, len(need - {r}))
    return worst * chunk_bytes


def simulate(mix, ranks, tokens, heads, kv_heads, head_dim, elem_bytes, min_shard, tolerance):
    n = ranks * tokens
    lengths = doc_lengths(mix, n)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()))
    t0 = time.perf_counter()
    plan = plan_cad(
        cu,
        1,
        n,
        ranks,
        "zigzag",
        min_shard=min_shard,
        tolerance=tolerance,
        qrow_bytes=heads,
        kvrow_bytes=2 * kv_heads,
    )
    elapsed = time.perf_counter() - t0
    report = plan.summary(heads, kv_heads, head_dim, elem_bytes)
    ring = (ranks - 1) * 2 * tokens * kv_heads * head_dim * elem_bytes
    return dict(
        mix=mix,
        ranks=ranks,
        tokens_per_rank=tokens,
        docs=len(lengths),
        balance_zigzag=report["balance_before"],
        balance_cad=report["balance_after"],
        memory_balance_cad=report["memory_balance"],
        mib_per_rank_cad=round(report["bytes_per_rank_max"] / 2**20, 1),
        mib_per_rank_ring=round(ring / 2**20, 1),
        mib_per_rank_allgather=round(allgather_needed_bytes(cu, n, ranks, ring // (ranks - 1)) / 2**20, 1),
        plan_s=round(elapsed, 2),
    )


def plot(rows, path):
    mixes = sorted({r["mix"] for r in rows})
    fig, axes = plot_axes(len(mixes))
    for j, mix in enumerate(mixes):
        for t in sorted({r["tokens_per_rank"] for r in rows}):
            sel = sorted((r for r in rows if r["mix"] == mix and r["tokens_per_rank"] == t), key=lambda r: r["ranks"])
            x = [r["ranks"] for r in sel]
            label = f"{t // 1024}K/rank"
            axes[0][j].plot(x, [r["balance_zigzag"] for r in sel], "o--", label=f"ring/allgather zigzag {label}")
            axes[0][j].plot(x, [r["balance_cad"] for r in sel], "o-", label=f"cad {label}")
            axes[1][j].plot(x, [r["mib_per_rank_ring"] for r in sel], "o--", label=f"ring {label}")
            axes[1][j].plot(x, [r["mib_per_rank_allgather"] for r in sel], "o:", label=f"allgather {label}")
            axes[1][j].plot(x, [r["mib_per_rank_cad"] for r in sel], "o-", label=f"cad {label}")
        axes[0][j].set_title(f"{mix}: attention max/mean")
        axes[1][j].set_title(f"{mix}: MiB received per rank per layer (fwd)")
        axes[1][j].set_yscale("log")
        for ax in axes[:, j]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("ranks")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 512])
    p.add_argument("--tokens-per-rank", type=int, nargs="+", default=[131072, 524288])
    p.add_argument("--mixes", nargs="+", default=["prolong", "lognormal", "one_huge"])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--elem-bytes", type=int, default=2)
    p.add_argument("--min-shard", type=int, default=128)
    p.add_argument("--tolerance", type=float, default=1.1)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for mix in args.mixes:
        for ranks in args.ranks:
            for tokens in args.tokens_per_rank:
                rows.append(
                    simulate(
                        mix,
                        ranks,
                        tokens,
                        args.heads,
                        args.kv_heads,
                        args.head_dim,
                        args.elem_bytes,
                        args.min_shard,
                        args.tolerance,
                    )
                )
                print(rows[-1], flush=True)
    write_outputs(rows, args.out, "cad_sim", plot, COLUMNS)


if __name__ == "__main__":
    main()
