"""The hybrid-ratio study (which linear mixer, which linear:softmax ratio keeps recall) from a
Hydra multirun of ``conf/experiment/hybrid_sweep.yaml``:

    python -m trainer.train -m experiment=hybrid_sweep \\
        'model.mixer_pattern=[gla,softmax],[gla,gla,gla,softmax],[gla,gla,gla,gla,gla,gla,gla,softmax],[gla]'
    python -m trainer.hybrid_study multirun/hybrid_sweep/<date>      # table + hybrid_study.png

Each job dir holds ``.hydra/config.yaml`` (its mixer pattern) and ``metrics.jsonl`` (the last
row with ``val_loss`` is its final evaluation: held-out loss and ``mqar@L`` recall). A pattern
cycled over ``model.n_layers`` layers gives (linear mixer, linear layers per softmax layer;
inf for an all-linear model). The plot: recall and held-out loss against the ratio, one curve
per linear mixer.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os


def pattern_point(pattern: list[str], n_layers: int) -> tuple[str, float]:
    """(the linear mixer, linear : softmax layers) of a mixer pattern cycled over ``n_layers``;
    ValueError for a pattern mixing two non-softmax mixers."""
    layers = [pattern[i % len(pattern)] for i in range(n_layers)]
    other = sorted(set(layers) - {"softmax"})
    if len(other) != 1:
        raise ValueError(f"model.mixer_pattern={pattern}: the study needs exactly one mixer beside softmax")
    soft = layers.count("softmax")
    return other[0], (len(layers) - soft) / soft if soft else math.inf


def collect(sweep_dir: str) -> list[dict]:
    """One row per finished job of ``sweep_dir``: {mixer, ratio, val_loss, mqar: {L: acc}}."""
    from omegaconf import OmegaConf

    rows = []
    for cfg_path in sorted(glob.glob(os.path.join(sweep_dir, "*", ".hydra", "config.yaml"))):
        job = os.path.dirname(os.path.dirname(cfg_path))
        metrics = os.path.join(job, "metrics.jsonl")
        if not os.path.exists(metrics):
            continue
        evals = [r for r in map(json.loads, open(metrics).read().splitlines()) if "val_loss" in r]
        if not evals:
            continue
        cfg = OmegaConf.load(cfg_path)
        mixer, ratio = pattern_point(list(cfg.model.mixer_pattern), int(cfg.model.n_layers))
        last = evals[-1]
        mqar = {int(k.split("@")[1]): v for k, v in last.items() if k.startswith("mqar@")}
        rows.append(
            {"job": os.path.basename(job), "mixer": mixer, "ratio": ratio, "val_loss": last["val_loss"], "mqar": mqar}
        )
    return rows


def plot(rows: list[dict], path: str) -> str:
    """Recall (mean over MQAR lengths) and held-out loss vs ratio, one curve per mixer -> ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({r["ratio"] for r in rows})
    x_of = {q: i for i, q in enumerate(ratios)}  # evenly spaced, all-linear last
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mixer in sorted({r["mixer"] for r in rows}):
        mine = sorted((r for r in rows if r["mixer"] == mixer), key=lambda r: r["ratio"])
        xs = [x_of[r["ratio"]] for r in mine]
        recall = [sum(r["mqar"].values()) / len(r["mqar"]) if r["mqar"] else float("nan") for r in mine]
        axes[0].plot(xs, recall, marker="o", label=mixer)
        axes[1].plot(xs, [r["val_loss"] for r in mine], marker="o", label=mixer)
    labels = ["all linear" if math.isinf(q) else f"{q:g}:1" for q in ratios]
    for ax, name in zip(axes, ("MQAR recall", "held-out loss (nats/token)")):
        ax.set_xticks(range(len(ratios)), labels)
        ax.set(xlabel="linear : softmax layers", ylabel=name)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m trainer.hybrid_study", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", help="a Hydra multirun dir of experiment=hybrid_sweep")
    ap.add_argument("--out", default=None, help="the PNG (default: SWEEP_DIR/hybrid_study.png)")
    args = ap.parse_args(argv)
    rows = collect(args.sweep_dir)
    if not rows:
        raise SystemExit(
            f"[longctx] error: {args.sweep_dir} holds no finished job (.hydra/config.yaml + metrics.jsonl)"
        )
    for r in sorted(rows, key=lambda r: (r["mixer"], r["ratio"])):
        recall = " ".join(f"mqar@{k}={v:.3f}" for k, v in sorted(r["mqar"].items()))
        print(f"{r['mixer']:>12} {r['ratio']:>5g}:1 val_loss={r['val_loss']:.4f} {recall}")
    print(plot(rows, args.out or os.path.join(args.sweep_dir, "hybrid_study.png")))


if __name__ == "__main__":
    main()
