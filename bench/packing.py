"""Packing modes side by side on a prepared corpus: documents cut, padding, and the attention work
the ranks of a step wait for.

    python -m trainer.prepare stdlib --out prep/stdlib      # once
    python -m bench.packing prep/stdlib --seq-lens 4096 32768 --dp 4 --cp 4

For each ``data.packing`` (stream, best_fit, grouped) and row length N, about one epoch of the
training split is planned (trainer/data/prepared.py's RowPlanner; lengths only, no tokens read),
as ``dp`` data-parallel ranks of ``micro_batch`` rows each would receive it. Per packing:

    cut_pct        documents cut by a row end (or, best_fit / grouped: longer than a row), % of drawn
    pad_pct        padding positions, % of all positions
    dp_wait        sum over steps of the busiest rank's attention pairs / sum of the mean rank's:
                   the attention part of the step time against perfectly balanced ranks, when each
                   rank's row is balanced over its CP group (CAD's plan, or cp = 1)
    zigzag_wait    the same over all dp x cp ranks, each row placed by the zigzag layout without CAD
                   (ring, all-gather): its imbalance inside the row times that across rows
    cad_wait       the same with each row's CP group planned by CAD (default tolerance 1.1)

Pairs are the causal (query, key) pairs of each document piece and of the padding, L (L + 1) / 2: what a varlen
kernel computes, and what CAD balances. Writes ``packing.csv`` into --out.
"""

from __future__ import annotations

import argparse
import csv
import os

import torch

from bench.runner import print_table
from parallel.cad_plan import plan_cad
from trainer.data.prepared import GROUP_STEPS, PACKINGS, DocStream, RowPlanner
from trainer.data.shards import PreparedCorpus

COLUMNS = ["seq_len", "packing", "rows", "cut_pct", "pad_pct", "dp_wait", "zigzag_wait", "cad_wait"]


def _wait(loads: list[list[float]]) -> float:
    """sum over steps of max load / sum over steps of mean load (``loads[step][rank]``)."""
    busiest = sum(max(s) for s in loads)
    mean = sum(sum(s) / len(s) for s in loads)
    return busiest / mean if mean else 1.0


def measure(corpus, seq_len: int, packing: str, dp: int, cp: int, micro_batch: int = 1, seed: int = 0) -> dict:
    """One row of the table (see the module docstring)."""
    stream = DocStream(corpus, "train", 0.02, seed)
    step_rows = dp * micro_batch
    planner = RowPlanner([stream], [1.0], seq_len, packing, step_rows, seed)
    window = GROUP_STEPS * step_rows
    epoch_rows = corpus.n_tokens // seq_len
    n_rows = max(window, (epoch_rows + window - 1) // window * window)
    dp_loads, zz_loads, cad_loads = [], [], []
    for _ in range(n_rows // step_rows):
        per_rank, zz, cad = [0.0] * dp, [0.0] * (dp * cp), [0.0] * (dp * cp)
        for i in range(step_rows):
            plan = planner.next_plan()
            r = i % dp  # global row i of the step goes to rank i % dp (PreparedLoader)
            starts = [0]
            for _, _, a, b in plan:
                starts.append(starts[-1] + b - a)
            if starts[-1] < seq_len:
                starts.append(seq_len)  # padding is its own segment (trainer/data/prepared.py build_row)
            per_rank[r] += sum((b - a) * (b - a + 1) / 2 for a, b in zip(starts[:-1], starts[1:]))
            if cp > 1:
                p = plan_cad(torch.tensor(starts), 1, seq_len, cp, "zigzag")
                for c in range(cp):
                    zz[r * cp + c] += p.home_load[c]
                    cad[r * cp + c] += p.load[c]
        dp_loads.append(per_rank)
        zz_loads.append(zz)
        cad_loads.append(cad)
    return dict(
        seq_len=seq_len,
        packing=packing,
        rows=n_rows,
        cut_pct=round(100 * planner.cut / max(planner.docs, 1), 1),
        pad_pct=round(100 * planner.pad / (planner.rows * seq_len), 2),
        dp_wait=round(_wait(dp_loads), 3),
        zigzag_wait=round(_wait(zz_loads), 3) if cp > 1 else None,
        cad_wait=round(_wait(cad_loads), 3) if cp > 1 else None,
    )


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prepared", help="a prepared directory (python -m trainer.prepare ... --out DIR)")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--packings", nargs="+", default=list(PACKINGS), choices=PACKINGS)
    ap.add_argument("--dp", type=int, default=4)
    ap.add_argument("--cp", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)
    corpus = PreparedCorpus([args.prepared])
    rows = [
        measure(corpus, n, packing, args.dp, args.cp, args.micro_batch)
        for n in args.seq_lens
        for packing in args.packings
    ]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "packing.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print_table(rows, COLUMNS)
    return rows


if __name__ == "__main__":
    main()
