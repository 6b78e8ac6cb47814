"""Evaluation reports: flat metrics (trainer/evaluate.py) -> a JSON summary and PNG plots
(held-out loss by position, passkey accuracy over lengths x depths). matplotlib is optional
(the ``bench`` extra): without it the summary is still written."""

from __future__ import annotations

import json
import os
import re


def summarize(metrics: dict) -> dict:
    """Flat metrics -> {val_loss, loss_by_position: {edges, loss}, passkey: {lengths, depths,
    accuracy [L][D]}, mqar: {length: acc}} (the JSON summary)."""
    out = {"val_loss": metrics.get("val_loss")}
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
        print("[longctx] matplotlib is not installed (pip install 'longctx[bench]'): no plots")
        return []
    os.makedirs(out_dir, exist_ok=True)
    files = []
    curves = {k: s["loss_by_position"] for k, s in summaries.items() if "loss_by_position" in s}
    if curves:
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
        for label, c in curves.items():
            mids = [(a + b) / 2 for a, b in zip(c["edges"], c["edges"][1:])]
            ax.plot(mids, c["loss"], marker="o", ms=3, label=label)
        ax.set(xlabel="position in document (tokens)", ylabel="held-out loss (nats/token)", xscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        files.append(os.path.join(out_dir, f"{prefix}loss_by_position.png"))
        fig.savefig(files[-1])
        plt.close(fig)
    grids = {k: s["passkey"] for k, s in summaries.items() if s.get("passkey", {}).get("accuracy")}
    if grids:
        fig, axes = plt.subplots(1, len(grids), figsize=(2.6 * len(grids) + 0.8, 2.8), dpi=110, squeeze=False)
        for ax, (label, g) in zip(axes[0], grids.items()):
            acc = [[float("nan") if v is None else v for v in row] for row in g["accuracy"]]
            im = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
            ax.set_xticks(range(len(g["depths"])), [f"{d:g}" for d in g["depths"]], fontsize=7)
            ax.set_yticks(range(len(g["lengths"])), [str(n) for n in g["lengths"]], fontsize=7)
            ax.set(title=label, xlabel="needle depth")
            ax.title.set_fontsize(8)
        axes[0][0].set_ylabel("context length")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="passkey accuracy")
        files.append(os.path.join(out_dir, f"{prefix}passkey_heatmap.png"))
        fig.savefig(files[-1])
        plt.close(fig)
    return files


def write_report(out_dir: str, name: str, metrics: dict, plots: bool = True) -> dict:
    """``out_dir/{name}.json`` (the summary) and ``out_dir/{name}_*.png``; returns the summary."""
    os.makedirs(out_dir, exist_ok=True)
    summary = summarize(metrics)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if plots:
        plot_summaries({name: summary}, out_dir, f"{name}_")
    return summary
