"""The MLA upcycling example on CPU (README "Upcycling into MLA"), one process:

    python -m trainer.upcycle_example --out docs/upcycle_mla [--steps 150 --distill-steps 30]

Pretrains the worked example's small softmax model at 512 tokens (its ``pretrain`` stage), then
runs ``recipe=upcycle_mla`` from that run dir at two latent ranks (only its distillation stage):
three of the four layers become MLA initialised by SVD, then distil to the frozen teacher. Writes
``results.json`` with, per model, the KV-cache bytes per token (bf16, every layer) and the
held-out loss (teacher at its end; student after SVD initialisation = the distillation stage's
start, and after distillation = its end), and prints the README table.
"""

from __future__ import annotations

import argparse
import json
import os


def _train(rank, world, overrides, keep_stages):
    from hydra import compose, initialize_config_dir

    from trainer.config import conf_dir, register_schema
    from trainer.train import to_config, train

    register_schema()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = to_config(compose(config_name="train", overrides=overrides))
    cfg.recipe.stages = cfg.recipe.stages[:keep_stages]
    train(cfg)
    from trainer import stages

    return stages.plan(cfg)[0].cfg.model  # the model the stage trained (its overrides applied)


def _losses(run_dir, stage):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    mine = [r for r in rows if r.get("stage") == stage and "val_loss" in r]
    return next(r for r in mine if r.get("at") == "start")["val_loss"], next(r for r in mine if r.get("at") == "end")[
        "val_loss"
    ]


def main(argv=None):
    from models.kv_cache import kv_cache_bytes
    from parallel.spawn import run_distributed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/upcycle_mla")
    p.add_argument("--run-dir", default="runs/upcycle_mla")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--distill-steps", type=int, default=30)
    p.add_argument("--ranks", type=int, nargs="+", default=[32, 8])
    args = p.parse_args(argv)
    common = ["recipe=cpu_example", "trainer.save_every=0", "trainer.passkey_lengths=[512]"]
    base = os.path.join(args.run_dir, "teacher")
    teacher = run_distributed(
        _train, 1, common + [f"trainer.run_dir={base}", f"recipe.stages.0.steps={args.steps}"], 1, timeout=3600
    )[0]
    t_bytes = kv_cache_bytes(teacher)["kv_cache_bytes_per_token"]
    rows = [dict(model="teacher (4 softmax)", kv_bytes=t_bytes, loss=_losses(base, "pretrain")[1])]
    for rank in args.ranks:
        run = os.path.join(args.run_dir, f"mla_r{rank}")
        over = [o for o in common if not o.startswith("recipe=")] + ["recipe=upcycle_mla", f"init_from={base}"]
        over += [
            f"trainer.run_dir={run}",
            f"model.mla_kv_lora_rank={rank}",
            f"recipe.stages.0.steps={args.distill_steps}",
        ]
        over += ["data.micro_batch=1", "data.passkey_fraction=0.5", "data.passkey_doc_chars=[128,256,384]"]
        over += ["data.long_min_chars=16384", "trainer.eval_batches=4"]
        student = run_distributed(_train, 1, over, 1, timeout=3600)[0]
        start, end = _losses(run, "distill")
        rows.append(
            dict(
                model=f"3 mla (Dc {rank} + Dr 16) : 1 softmax",
                kv_bytes=kv_cache_bytes(student)["kv_cache_bytes_per_token"],
                svd=start,
                loss=end,
            )
        )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(steps=args.steps, distill_steps=args.distill_steps, rows=rows), f, indent=2)
    print(render(rows))


def render(rows) -> str:
    t = rows[0]["kv_bytes"]
    lines = [
        "| model | KV cache, bytes/token (bf16) | held-out loss after SVD init | held-out loss |",
        "|---|---|---|---|",
    ]
    for r in rows:
        ratio = f" ({t / r['kv_bytes']:.2f}x smaller)" if r["kv_bytes"] != t else ""
        svd = f"{r['svd']:.3f}" if "svd" in r else "-"
        lines.append(f"| {r['model']} | {r['kv_bytes']}{ratio} | {svd} | {r['loss']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
