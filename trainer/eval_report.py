"""Evaluation reports: flat metrics (trainer/evaluate.py) -> a JSON summary and PNG plots
(held-out loss by position, passkey accuracy over lengths x depths). matplotlib is optional
(the ``bench`` extra): without it the summary is still written."""

from __future__ import annotations

import json
import os
import re


def summarize(metrics: dict) -> dict:
    """Flat metrics -> {val_loss, loss_by_position: {edges, loss}, passkey: {lengths, depths,
    accuracy [L][D]}, mqar: {length: acc}, copy: {string length: acc}} (the JSON summary)."""
    out = {"val_loss": metrics.get("val_loss")}
    for key in ("kv_cache_bytes_per_token", "state_bytes"):  # models/kv_cache.py
        if key in metrics:
            out[key] = metrics[key]
    pos = sorted(
        (int(m[1]), int(m[2]), v) for k, v in metrics.items() if (m := re.fullmatch(r"val_loss@pos(\d+)-(\d+)", k))
    )
    if pos:
        out["loss_by_position"] = {"edges": [p[0] for p in pos] + [pos[-1][1]], "loss": [p[2] for p in pos]}
    cells = {(int(m[1]), float(m[2])): v for k, v in metrics.items() if (m := re.fullmatch(r"passkey@(\d+)@(.+)", k))}
    lengths = sorted({int(m[1]) for k in metrics if (m := re.fullmatch(r"passkey@(\d+)", k))})
    if lengths:
        depths = sorted({d for _, d in cells})
        out["passkey"] = {
            "lengths": lengths,
            "mean": [metrics[f"passkey@{n}"] for n in lengths],
            "depths": depths,
            "accuracy": [[cells.get((n, d)) for d in depths] for n in lengths] if depths else [],
        }
    by_source = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("val_loss/")}
    if by_source:  # a prepared-data mixture: the held-out loss of each source
        out["val_loss_by_source"] = by_source
    mqar = {int(m[1]): v for k, v in metrics.items() if (m := re.fullmatch(r"mqar@(\d+)", k))}
    if mqar:
        out["mqar"] = mqar
    copies = {int(m[1]): v for k, v in metrics.items() if (m := re.fullmatch(r"copy@(\d+)", k))}
    if copies:
        out["copy"] = copies
    return out


def plot_summaries(summaries: dict[str, dict], out_dir: str, prefix: str = "") -> list[str]:
    """PNG plots: held-out loss by position (one curve per summary) and, per summary with a
    passkey grid, a lengths x depths accuracy heatmap. Returns the files written ([] without
    matplotlib, with a line saying so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[longctx] matplotlib is not installed (pip install -e '.[bench]'): no plots")
        return []
    os.makedirs(out_dir, exist_ok=True)
    files = []
    curves = {k: s["loss_by_position"] for k, s in summaries.items() if "loss_by_position" in s}
    if curves:
        fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=110, layout="constrained")
        for label, c in curves.items():
            mids = [(a + b) / 2 for a, b in zip(c["edges"], c["edges"][1:])]
            ax.plot(mids, c["loss"], marker="o", ms=3, label=label)
        ax.set(xlabel="position in document (tokens)", ylabel="held-out loss (nats/token)", xscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)  # off the curves
        files.append(os.path.join(out_dir, f"{prefix}loss_by_position.png"))
        fig.savefig(files[-1])
        plt.close(fig)
    curves = {k: s for k, s in summaries.items() if len(s.get("passkey", {}).get("lengths", [])) > 1}
    if curves:  # retrieval vs context length, one line per summary (per stage)
        files.append(os.path.join(out_dir, f"{prefix}accuracy_vs_length.png"))
        _accuracy_vs_length(plt, curves, files[-1])
    grids = {k: s["passkey"] for k, s in summaries.items() if s.get("passkey", {}).get("accuracy")}
    if grids:
        files.append(os.path.join(out_dir, f"{prefix}passkey_heatmap.png"))
        _heatmaps(plt, grids, files[-1])
        return files


def _accuracy_vs_length(plt, summaries: dict[str, dict], path: str) -> None:
    """Passkey accuracy (mean over depths, solid) and MQAR accuracy (dashed, where measured)
    against context length, one colour per summary."""
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=110, layout="constrained")
    for i, (label, s) in enumerate(summaries.items()):
        colour = f"C{i % 10}"
        ax.plot(s["passkey"]["lengths"], s["passkey"]["mean"], marker="o", color=colour, label=f"{label} passkey")
        if s.get("mqar"):
            mq = sorted((int(n), v) for n, v in s["mqar"].items())
            ax.plot(*zip(*mq), marker="s", ls="--", color=colour, alpha=0.7, label=f"{label} MQAR")
    lengths = sorted({n for s in summaries.values() for n in s["passkey"]["lengths"]})
    ax.set(xlabel="context length (tokens)", ylabel="retrieval accuracy", xscale="log", ylim=(-0.03, 1.03))
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.savefig(path)
    plt.close(fig)


def _heatmaps(plt, grids: dict[str, dict], path: str) -> None:
    """Passkey accuracy, one lengths x depths panel per summary, at most 3 panels a row (a
    readable page-width figure); the length labels only on each row's first panel, the value written in every cell."""
    rows = -(-len(grids) // 3)
    cols = -(-len(grids) // rows)
    g0 = next(iter(grids.values()))
    w = 0.6 * len(g0["depths"]) + 1.0  # inches per panel: room for the cells and their values
    h = 0.5 * len(g0["lengths"]) + 1.2
    fig, axes = plt.subplots(
        rows, cols, figsize=(w * cols + 1.2, h * rows + 0.6), dpi=120, squeeze=False, sharey=True, layout="constrained"
    )
    for ax, (label, g) in zip(axes.flat, grids.items()):
        acc = [[float("nan") if v is None else v for v in row] for row in g["accuracy"]]
        im = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        for i, row in enumerate(acc):
            for j, v in enumerate(row):
                if v == v:  # not nan
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=8, color="w" if v < 0.6 else "k")
        ax.set_xticks(range(len(g["depths"])), [f"{d:g}" for d in g["depths"]], fontsize=8)
        ax.set_yticks(range(len(g["lengths"])), [str(n) for n in g["lengths"]], fontsize=8)
        ax.set_title(label, fontsize=9)
    for ax in axes.flat[len(grids) :]:
        ax.set_visible(False)
    fig.supxlabel("needle depth (fraction of the context)", fontsize=9)
    fig.supylabel("context length (tokens)", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.9, label="passkey accuracy")
    fig.savefig(path)
    plt.close(fig)


def write_report(out_dir: str, name: str, metrics: dict, plots: bool = True) -> dict:
    """``out_dir/{name}.json`` (the summary) and ``out_dir/{name}_*.png``; returns the summary."""
    os.makedirs(out_dir, exist_ok=True)
    summary = summarize(metrics)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if plots:
        plot_summaries({name: summary}, out_dir, f"{name}_")
    return summary
