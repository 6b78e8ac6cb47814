"""Per-step time of each training engine relative to native, on the same model, data and ranks.

    python -m bench.engines [--world 2] [--steps 12] [--seq-len 512] [--out bench_out]

One spawn of ``--world`` gloo ranks (CP over all of them, the quickstart's hybrid model) runs the
trainer under native DDP, DeepSpeed ZeRO 0-3 and Accelerate DDP; each step is timed from the
trainer's own ``tokens_per_s`` (log_every=1), the first ``--warmup`` steps dropped, the median
kept; ``--rounds`` runs the whole list again and keeps each engine's fastest round (a shared
machine's load moves under the runs). Prints a table and writes ``<out>/engines.csv``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import statistics
import tempfile

from parallel.spawn import run_distributed

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
ENGINES = {
    "native": ["engine=native"],
    "deepspeed zero0": ["engine=deepspeed", "trainer.engine.deepspeed.zero_optimization.stage=0"],
    "deepspeed zero1": ["engine=deepspeed", "trainer.engine.deepspeed.zero_optimization.stage=1"],
    "deepspeed zero2": ["engine=deepspeed", "trainer.engine.deepspeed.zero_optimization.stage=2"],
    "deepspeed zero3": ["engine=zero3"],
    "accelerate ddp": ["engine=accelerate"],
}


def _bench(rank, world, runs):
    from hydra import compose, initialize_config_dir

    from trainer.train import to_config, train

    for overrides in runs:
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            train(to_config(compose(config_name="train", overrides=overrides)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="bench_out")
    args = p.parse_args()
    names = [n for n in ENGINES if importlib.util.find_spec(n.split()[0]) is not None or n == "native"]
    root = tempfile.mkdtemp(prefix="bench_engines_")
    common = [
        "experiment=quickstart",
        f"parallel.cp.size={args.world}",
        f"data.seq_len={args.seq_len}",
        f"trainer.steps={args.steps}",
        "trainer.log_every=1",
        "trainer.save_every=0",
        "trainer.eval_batches=1",
        "trainer.passkey_lengths=[]",
        "trainer.progress_bar=false",
        "trainer.device=cpu",
        "logger.wandb=false",
    ]
    cells = [(r, i, n) for r in range(args.rounds) for i, n in enumerate(names)]
    runs = [common + ENGINES[n] + [f"trainer.run_dir={root}/{r}_{i}"] for r, i, n in cells]
    run_distributed(_bench, args.world, runs, timeout=3600)
    rows = []
    tokens = 2 * args.seq_len  # tokens per step of all ranks (micro_batch 2, dp 1), as the trainer counts them
    for i, name in enumerate(names):
        medians = []
        for r in range(args.rounds):
            metrics = [json.loads(line) for line in open(f"{root}/{r}_{i}/metrics.jsonl")]
            tok_s = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m][args.warmup :]
            medians.append(1000 * statistics.median(tokens / t for t in tok_s))
        rows.append({"engine": name, "step_ms": min(medians)})
    base = rows[0]["step_ms"]
    for r in rows:
        r["relative"] = r["step_ms"] / base
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "engines.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["engine", "step_ms", "relative"])
        w.writeheader()
        w.writerows(rows)
    print(f"{'engine':<18}{'step ms':>10}{'x native':>10}")
    for r in rows:
        print(f"{r['engine']:<18}{r['step_ms']:>10.1f}{r['relative']:>10.2f}")


if __name__ == "__main__":
    main()
