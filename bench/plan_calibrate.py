"""The cost model against this machine: predictions for bench.cp / bench.linear_cp rows.

    python -m bench.plan --calibrate            # runs both benchmarks (world 2 and 4), prints the table

For every measured row (one attention layer, fwd + bwd, slowest rank) the model is given the
same shape (heads, head dim, length, world, strategy and its options, layout, the mask's
documents and window, fp32) and the ``cpu`` profile (conf/cluster/cpu.yaml, measured once by a
micro-benchmark, not fitted to these rows). Bytes must be equal (all-gather's gather="needed"
receives less than the all-gather formula under document and window masks: there the model
states the upper bound); time within ``TIME_FACTOR``; and within each (world, length, mask)
the strategies should come in the same order.
"""

from __future__ import annotations

import os

from bench.cp import make_inputs, parse_spec
from models.config import ModelConfig
from parallel.cost_model import RunSpec, attention_saved_bytes, layer_cost, load_cluster

TIME_FACTOR = 3.0  # predicted / measured within [1/3, 3] on this shared 2-core machine
# Linear strategies: the cost model times the chunked op by its executed matmuls, its elementwise
# passes and its chunk scan (parallel/cost_model.py linear_core_seconds), each rate measured by a
# micro-benchmark (conf/cluster/cpu.yaml), not by the MFU count of the mixer.
PREDICTED_COLUMNS = ["predicted_ms", "predicted_bytes"]


def bench_profile() -> str | None:
    """The cluster profile of this machine: ``cpu``, or the GPU's (h100, h200, a100, h800; None
    for another GPU: the benchmark then prints no prediction)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    return next((p for p in ("h100", "h200", "a100", "h800") if p in name), None)


def with_predictions(rows, heads, kv_heads, head_dim, kind="softmax", layout="zigzag") -> list[dict]:
    """``rows`` of bench.cp / bench.linear_cp with the cost model's ``predicted_ms`` (the layer's
    core op, fwd + bwd, slowest rank) and ``predicted_bytes`` (forward, per rank) beside the
    measured ones; blank for peers and where no profile fits this machine."""
    from trainer.config import conf_dir

    profile = bench_profile()
    cluster = load_cluster(os.path.join(conf_dir(), "cluster", f"{profile}.yaml")) if profile else None
    out = []
    for r in rows:
        r = dict(r, predicted_ms="", predicted_bytes="")
        if cluster is not None and not str(r["strategy"]).startswith("peer:"):
            p = predict_row(dict(r, layout=layout), cluster, heads, kv_heads, head_dim, kind)
            r.update(predicted_ms=p["predicted_ms"], predicted_bytes=p["predicted_bytes"])
        out.append(r)
    return out


def predict_sparse(rows, args) -> list[dict]:
    """bench.sparse_cp rows with predictions: ``dense_pred_ms`` and ``s2_pred_ms`` (one device),
    ``s2_cp_pred_ms`` and ``bytes_s2_pred`` (the CP world), from the S2 mixer's own FLOP count
    over its pattern and the s2 strategy's byte formula."""
    profile = bench_profile()
    if profile is None:
        return rows
    from trainer.config import conf_dir

    cluster = load_cluster(os.path.join(conf_dir(), "cluster", f"{profile}.yaml"))
    base = dict(vocab_size=32, dim=args.heads * args.head_dim, n_layers=1, n_heads=args.heads)
    base.update(n_kv_heads=args.kv_heads, head_dim=args.head_dim)
    out = []
    for r in rows:
        import warnings

        with warnings.catch_warnings():  # patterns whose KV heads do not cover the stride: local blocks do
            warnings.simplefilter("ignore", UserWarning)
            sparse = ModelConfig(
                **base, mixer_pattern=["s2"], s2_block=args.block, s2_stride=int(r["stride"]), s2_local=args.local
            )
            dense = ModelConfig(**base)
            n = int(r["seq_len"])
            r = dict(r, dense_pred_ms=_core_ms(cluster, dense, n)[0], s2_pred_ms=_core_ms(cluster, sparse, n)[0])
            if r.get("world_size") not in (None, ""):
                t, b = _core_ms(cluster, sparse, n, int(r["world_size"]))
                r.update(s2_cp_pred_ms=t, bytes_s2_pred=b)
        out.append(r)
    return out


def _core_ms(cluster, cfg, n: int, world: int = 1) -> tuple[float, int]:
    """(core op ms fwd + bwd, forward bytes per rank) of one layer of ``cfg`` at N = ``n``."""
    spec = RunSpec(cfg, n, cp=world, strategies={"sparse": "s2"}, layout="zigzag", dtype="fp32")
    c = layer_cost(cluster, spec, 0, params=0)
    return round((c.time_s - c.gemm_s) * 1e3, 1), c.fwd_bytes


SPARSE_PREDICTED = ["dense_pred_ms", "s2_pred_ms", "s2_cp_pred_ms", "bytes_s2_pred"]


def _doc_lens(n: int, mask: str) -> tuple:
    _, _, _, _, cu, _ = make_inputs(n, 1, 1, 1, mask)
    return tuple(int(b - a) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()))


def predict_row(row: dict, cluster, heads: int, kv_heads: int, head_dim: int, kind: str = "softmax") -> dict:
    """{predicted_ms, predicted_bytes} for one benchmark row."""
    n, world, mask = int(row["seq_len"]), int(row["world_size"]), row["mask"]
    spec_name = row["strategy"]
    if kind == "linear" or ":" in spec_name and "=" not in spec_name:
        name, _, layout = spec_name.partition(":")
        options = {}
    else:
        (name, options), layout = parse_spec(spec_name), None
    mixer = "linear" if name in ("lasp1", "lasp2") else "softmax"
    cfg = ModelConfig(
        vocab_size=32,
        dim=heads * head_dim,
        n_layers=1,
        n_heads=heads,
        n_kv_heads=heads if kind == "linear" else kv_heads,
        head_dim=head_dim,
        mixer_pattern=[mixer],
        sliding_window=n // 8 if mask == "window" else None,
    )
    spec = RunSpec(
        cfg,
        n,
        cp=world,
        strategies={cfg.kind_of(0): name},
        options={cfg.kind_of(0): options},
        layout=layout or row.get("layout", "zigzag"),
        doc_lens=_doc_lens(n, mask),
        dtype="fp32",
    )
    c = layer_cost(cluster, spec, 0, params=0)
    mem = attention_saved_bytes(spec, 0) / 2**20 if mixer == "softmax" else None
    return dict(predicted_ms=round((c.time_s - c.gemm_s) * 1e3, 2), predicted_bytes=c.fwd_bytes, predicted_mem_mb=mem)


def compare(rows: list[dict], cluster, heads, kv_heads, head_dim, kind="softmax", layout="zigzag") -> list[dict]:
    """Rows with the prediction, the time ratio and whether bytes are equal."""
    out = []
    for r in rows:
        if str(r["strategy"]).startswith("peer:") or int(r["world_size"]) < 2:
            continue
        r = dict(r, layout=layout)
        p = predict_row(r, cluster, heads, kv_heads, head_dim, kind)
        out.append(
            dict(
                strategy=r["strategy"],
                world_size=r["world_size"],
                seq_len=r["seq_len"],
                mask=r["mask"],
                measured_ms=float(r["fwd_bwd_ms"]),
                predicted_ms=p["predicted_ms"],
                time_ratio=round(p["predicted_ms"] / float(r["fwd_bwd_ms"]), 2),
                measured_bytes=int(r["bytes_per_rank"]),
                predicted_bytes=p["predicted_bytes"],
                bytes_equal=int(r["bytes_per_rank"]) == p["predicted_bytes"],
                measured_mem_mb=float(r["peak_mem_mb"]),
                predicted_mem_mb=None if p["predicted_mem_mb"] is None else round(p["predicted_mem_mb"], 2),
            )
        )
    return out


def time_ratios(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """{"softmax" | "linear": (min, max) of predicted / measured time} over ``rows``."""
    out: dict = {}
    for r in rows:
        kind = "linear" if str(r["strategy"]).split(":")[0] in ("lasp1", "lasp2") else "softmax"
        lo, hi = out.get(kind, (float("inf"), 0.0))
        out[kind] = (min(lo, r["time_ratio"]), max(hi, r["time_ratio"]))
    return out


def order_agreement(rows: list[dict], apart: float = 1.0) -> float:
    """Fraction of strategy pairs (same world, length, mask) measured more than ``apart`` x apart
    that the model orders as measured (1.0: every pair; e.g. 1.25: pairs the noise of a shared
    machine cannot swap)."""
    agree = total = 0
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["world_size"], r["seq_len"], r["mask"]), []).append(r)
    for g in groups.values():
        for i in range(len(g)):
            for j in range(i + 1, len(g)):
                a, b = g[i], g[j]
                lo, hi = sorted((a["measured_ms"], b["measured_ms"]))
                if hi <= apart * lo:
                    continue
                total += 1
                agree += (a["measured_ms"] < b["measured_ms"]) == (a["predicted_ms"] < b["predicted_ms"])
    return agree / total if total else 1.0


def run(conf: str, out: str) -> list[dict]:
    """Run bench.cp and bench.linear_cp on this machine (small grid) and compare."""
    import csv

    from bench import cp, linear_cp

    cluster = load_cluster(os.path.join(conf, "cluster", "cpu.yaml"))
    # CPU time of each process (--clock cpu): on a shared machine the wall clock also times the neighbours
    common = ["--world-sizes", "2", "4", "--seq-lens", "2048", "4096", "--repeats", "3", "--out", out]
    cp.main(common + ["--masks", "causal", "docs", "--no-peers", "--clock", "cpu"])
    linear_cp.main(common + ["--masks", "causal", "docs", "--strategies", "lasp2", "lasp1", "--clock", "cpu"])
    rows = []
    with open(os.path.join(out, "cp.csv")) as f:
        rows += compare(list(csv.DictReader(f)), cluster, 4, 2, 32)
    with open(os.path.join(out, "linear_cp.csv")) as f:
        rows += compare(list(csv.DictReader(f)), cluster, 4, 4, 32, kind="linear", layout="contiguous")
    return rows


def main(argv=None):
    """The same as ``python -m bench.plan --calibrate [--out DIR]``."""
    from bench.plan import main as plan_main

    plan_main(["--calibrate", *(argv or [])])


if __name__ == "__main__":
    main()
