"""The hybrid-ratio study (which linear mixer, which linear:softmax ratio keeps recall) from a
Hydra multirun of ``conf/experiment/hybrid_sweep.yaml``:

    python -m trainer.train -m experiment=hybrid_sweep \\
        'model.mixer_pattern=[softmax],[gla,softmax],[gla,gla,gla,softmax],[gla]'
    python -m trainer.hybrid_study multirun/hybrid_sweep/<date>      # table + hybrid_study.png

Each job dir holds ``.hydra/config.yaml`` (its mixer pattern) and ``metrics.jsonl`` (the last
row with ``val_loss`` is its final evaluation: held-out loss, ``copy@L`` copying and ``mqar@L``
recall). A pattern cycled over ``model.n_layers`` layers gives (linear mixer, linear layers per
softmax layer; inf for an all-linear model, 0 for all-softmax: mixer "softmax"). The plot: copy
accuracy, MQAR recall and held-out loss against the ratio, one curve per linear mixer, the
all-softmax run as a horizontal reference line.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os


def pattern_point(pattern: list[str], n_layers: int) -> tuple[str, float]:
    """(the linear mixer, linear : softmax layers) of a mixer pattern cycled over ``n_layers``
    (("softmax", 0.0) for an all-softmax model); ValueError for a pattern mixing two
    non-softmax mixers."""
    layers = [pattern[i % len(pattern)] for i in range(n_layers)]
    other = sorted(set(layers) - {"softmax"})
    if not other:
        return "softmax", 0.0
    if len(other) != 1:
        raise ValueError(f"model.mixer_pattern={pattern}: the study needs exactly one mixer beside softmax")
    soft = layers.count("softmax")
    return other[0], (len(layers) - soft) / soft if soft else math.inf


def collect(sweep_dir: str) -> list[dict]:
    """One row per finished job of ``sweep_dir`` (its last evaluation at ``trainer.steps``):
    {mixer, ratio, val_loss, mqar: {L: acc}, copy: {L: acc}}."""
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
        steps = OmegaConf.select(cfg, "trainer.steps")
        if steps is not None and last.get("step", steps) < steps:
            continue  # still training: its last evaluation is not the final one
        per = {m: {int(k.split("@")[1]): v for k, v in last.items() if k.startswith(m + "@")} for m in ("mqar", "copy")}
        rows.append({"job": os.path.basename(job), "mixer": mixer, "ratio": ratio, "val_loss": last["val_loss"], **per})
    return rows


def _mean(acc: dict) -> float:
    return sum(acc.values()) / len(acc) if acc else float("nan")


PANELS = (
    (lambda r: _mean(r["copy"]), "copy accuracy (mean over lengths)"),
    (lambda r: _mean(r["mqar"]), "MQAR recall (mean over lengths)"),
    (lambda r: r["val_loss"], "held-out loss (nats/token)"),
)


def plot(rows: list[dict], path: str) -> str:
    """Copy accuracy, MQAR recall (means over lengths) and held-out loss vs ratio, one curve per
    linear mixer, the all-softmax run(s) as a dashed line -> ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({r["ratio"] for r in rows if r["mixer"] != "softmax"})
    x_of = {q: i for i, q in enumerate(ratios)}  # evenly spaced, all-linear last
    soft = [r for r in rows if r["mixer"] == "softmax"]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(13, 4))
    for ax, (value, name) in zip(axes, PANELS):
        for mixer in sorted({r["mixer"] for r in rows} - {"softmax"}):
            mine = sorted((r for r in rows if r["mixer"] == mixer), key=lambda r: r["ratio"])
            ax.plot([x_of[r["ratio"]] for r in mine], [value(r) for r in mine], marker="o", label=mixer)
        if soft:
            ax.axhline(sum(map(value, soft)) / len(soft), color="k", ls="--", lw=1, label="all softmax")
        ax.set_xticks(range(len(ratios)), [ratio_label(q) for q in ratios])
        ax.set(xlabel="linear : softmax layers", ylabel=name)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ratio_label(ratio: float) -> str:
    return "all linear" if math.isinf(ratio) else "all softmax" if ratio == 0 else f"{ratio:g}:1"


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table: mixer, linear : softmax, held-out loss, copy@L, mqar@L."""
    cols = [(m, n) for m in ("copy", "mqar") for n in sorted({n for r in rows for n in r[m]})]
    lines = [
        "| mixer | linear : softmax | held-out loss | " + " | ".join(f"{m}@{n}" for m, n in cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for r in sorted(rows, key=lambda r: (r["mixer"] != "softmax", r["mixer"], r["ratio"])):
        accs = " | ".join(f"{r[m][n]:.3f}" if n in r[m] else "-" for m, n in cols)
        lines.append(f"| {r['mixer']} | {ratio_label(r['ratio'])} | {r['val_loss']:.3f} | {accs} |")
    return "\n".join(lines)


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
    print(table(rows))
    print(plot(rows, args.out or os.path.join(args.sweep_dir, "hybrid_study.png")))


if __name__ == "__main__":
    main()
