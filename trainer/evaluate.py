"""Evaluation: held-out loss (overall and by position in the document), passkey retrieval over
lengths x depths, multi-query associative recall (MQAR), copying; a JSON summary and PNG plots.

In the trainer it runs at every stage's start and end; on its own (also under torchrun, with
context parallelism for lengths one rank cannot hold):

    python -m trainer.evaluate RUN_DIR_or_HF_DIR [--out DIR] [key=value ...] [~key ...]
    python -m trainer.evaluate --plot SUMMARY.json [SUMMARY.json ...] --out DIR   # compare

Metric names (flat, as in metrics.jsonl): ``val_loss``, ``val_loss@pos{lo}-{hi}``,
``val_loss/{source}`` (each source of a prepared-data mixture, data.sources),
``passkey@{L}`` (mean over depths), ``passkey@{L}@{depth}``, ``mqar@{L}``, ``copy@{L}`` (strings
of L characters).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.kv_cache import kv_cache_bytes
from parallel.mesh import env_ranks
from trainer.batching import prepare_batch
from trainer.eval_report import plot_summaries, summarize, write_report
from trainer.run_checks import override_keys

# --------------------------------------------------------------------------- pure parts


def position_edges(seq_len: int, buckets: int) -> list[int]:
    """``buckets`` equal position ranges over [0, seq_len): edges [buckets + 1]."""
    return [round(i * seq_len / buckets) for i in range(buckets + 1)]


def bucket_sums(ce: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, edges: list[int]) -> torch.Tensor:
    """ce, positions, valid [N] -> [2, nb]: per bucket [lo, hi) of ``edges`` the sum of ``ce`` over
    valid tokens and their count."""
    nb = len(edges) - 1
    idx = torch.bucketize(positions, torch.tensor(edges[1:-1], device=positions.device), right=True)
    out = torch.zeros(2, nb, dtype=torch.float64, device=ce.device)
    out[0].index_add_(0, idx[valid], ce[valid].double())
    out[1].index_add_(0, idx[valid], torch.ones_like(ce[valid], dtype=torch.float64))
    return out


def answer_hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[hits, targets] (float) of argmax predictions at labelled positions (labels != -100)."""
    mask = labels != -100
    return torch.stack([(logits.argmax(-1)[mask] == labels[mask]).sum(), mask.sum()]).double()


def depths_of(cfg) -> list[float]:
    t = cfg.trainer
    return list(t.passkey_depths) or [(i + 0.5) / t.passkey_samples for i in range(t.passkey_samples)]


# --------------------------------------------------------------------------- model runs
def _autocast(cfg, mesh):
    """The training precision (trainer.precision=bf16: bf16 autocast), for evaluation too."""
    return torch.autocast(mesh.device.type, dtype=torch.bfloat16, enabled=cfg.trainer.precision == "bf16")


def token_ce(logits: torch.Tensor, labels: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Per-token cross entropy [N] fp32 of logits [N, V] (any dtype) against labels [N]
    (-100: 0), upcast ``chunk`` tokens at a time: never an fp32 copy of all [N, V] logits."""
    return torch.cat(
        [
            F.cross_entropy(logits[i : i + chunk].float(), labels[i : i + chunk], ignore_index=-100, reduction="none")
            for i in range(0, logits.shape[0], chunk)
        ]
    )


@torch.no_grad()
def heldout_loss(model, loader, cfg, mesh, strategies, buckets: int = 0, per_source: dict | None = None):
    """Mean next-token loss over ``trainer.eval_batches`` validation batches (the same rows every
    time); with ``buckets`` > 0 also (edges, loss per position bucket). ``per_source``: filled with
    {source name: loss} when the batches carry ``source`` (a prepared-data mixture)."""
    names = getattr(loader, "source_names", [])
    by_source = torch.zeros(2, max(len(names), 1), dtype=torch.float64, device=mesh.device)
    start = copy.deepcopy(loader.state_dict())  # every evaluation sees the same rows
    it = iter(loader)
    edges = position_edges(cfg.data.seq_len, buckets) if buckets else [0, cfg.data.seq_len]
    sums = torch.zeros(2, len(edges) - 1, dtype=torch.float64, device=mesh.device)
    for _ in range(cfg.trainer.eval_batches):
        batch, ctx = prepare_batch(next(it), cfg, mesh, strategies)
        with _autocast(cfg, mesh):
            logits = model(batch["input_ids"], batch["positions"], ctx)
        labels = batch["labels"].flatten()
        ce = token_ce(logits.flatten(0, 1), labels)
        sums += bucket_sums(ce, batch["positions"].flatten(), labels != -100, edges)
        if "source" in batch:  # per source: the same sums, bucketed by each token's source
            src = batch["source"].flatten().to(ce.device)
            by_source += bucket_sums(ce, src, (labels != -100) & (src >= 0), list(range(len(names) + 1)))
    dist.all_reduce(sums)  # every rank's tokens (dp rows, cp shards)
    if per_source is not None and len(names) > 1:
        dist.all_reduce(by_source)
        per_source.update({n: (by_source[0, i] / by_source[1, i].clamp_min(1)).item() for i, n in enumerate(names)})
    loader.load_state_dict(start)
    total = (sums[0].sum() / sums[1].sum().clamp_min(1)).item()
    per_bucket = (sums[0] / sums[1].clamp_min(1)).tolist()
    return (total, edges, per_bucket) if buckets else total


def _one_row(ids: list[int], labels: list[int], length: int) -> dict:
    pad = length - len(ids)
    return {
        "input_ids": torch.tensor(ids + [0] * pad)[None],
        "labels": torch.tensor(labels + [-100] * pad)[None],
        "positions": torch.arange(length)[None],
        "cu_seqlens": torch.tensor([0, length]),
    }


def _hits(model, row: dict, cfg, mesh, strategies) -> torch.Tensor:
    batch, ctx = prepare_batch(row, cfg, mesh, strategies)
    with _autocast(cfg, mesh):
        logits = model(batch["input_ids"], batch["positions"], ctx)
    hits = answer_hits(logits, batch["labels"])
    if mesh.cp > 1:
        dist.all_reduce(hits, group=mesh.cp_group)
    return hits


@torch.no_grad()
def passkey_accuracy(model, tokenizer, length: int, cfg, mesh, strategies, depth: float | None = None) -> float:
    """Teacher-forced: an example is correct when every answer token is the argmax. ``depth``
    None: ``passkey_samples`` examples at evenly spread depths; else that many at ``depth``."""
    from trainer.data import passkey_example

    n = cfg.trainer.passkey_samples
    rng = random.Random(1234 + length if depth is None else 1234 + length + round(depth * 1000) * 7919)
    correct = 0
    for i in range(n):
        ids, answer = passkey_example(
            tokenizer, length - len_answer_tokens(tokenizer), (i + 0.5) / n if depth is None else depth, rng
        )
        full = ids + answer
        labels = [-100] * (len(ids) - 1) + answer
        hits = _hits(model, _one_row(full[:-1], labels, length), cfg, mesh, strategies)
        correct += int(hits[0] == hits[1])
    return correct / n


@torch.no_grad()
def mqar_accuracy(model, tokenizer, length: int, cfg, mesh, strategies) -> float:
    """Share of MQAR query keys whose value is the argmax: trainer.data.mqar_example (one token
    per value) or, with ``trainer.mqar_format=text``, every token of the value's answer
    (kv_recall_example, the format data.mqar_fraction documents train; teacher-forced, one
    forward per query so that each answer is scored whole under any CP layout)."""
    from trainer.data import mqar_example

    rng = random.Random(4321 + length)
    if cfg.trainer.mqar_format == "text":
        from trainer.data.synthetic import kv_recall_example

        correct = total = 0
        for _ in range(cfg.trainer.mqar_samples):
            ids, spans = kv_recall_example(tokenizer, length + 1, cfg.trainer.mqar_pairs, rng)
            for a, b in spans:
                labels = [-100] * length
                labels[a - 1 : b - 1] = ids[a:b]
                hits = _hits(model, _one_row(ids[:-1], labels, length), cfg, mesh, strategies)
                correct, total = correct + int(hits[0] == hits[1]), total + 1
        return correct / max(total, 1)
    hits = torch.zeros(2, dtype=torch.float64)
    for _ in range(cfg.trainer.mqar_samples):
        ids, labels = mqar_example(tokenizer.vocab_size - 1, length, cfg.trainer.mqar_pairs, rng)
        hits += _hits(model, _one_row(ids, labels, length), cfg, mesh, strategies).cpu()
    return (hits[0] / hits[1].clamp_min(1)).item()


def copy_labels(ids: list[int], spans: list[tuple[int, int]]) -> list[int]:
    """Teacher-forced labels of the inputs ids[:-1]: label[t] = ids[t + 1] where ids[t + 1] lies
    in a span (a repeat to copy), -100 elsewhere (the first writing, separators, eos)."""
    labels = [-100] * (len(ids) - 1)
    for a, b in spans:
        labels[a - 1 : b - 1] = ids[a:b]
    return labels


@torch.no_grad()
def copy_accuracy(model, tokenizer, n_chars: int, cfg, mesh, strategies) -> float:
    """Held-out copying: ``trainer.copy_samples`` fresh random strings of ``n_chars`` characters,
    each written ``trainer.copy_repeats`` times (trainer.data.synthetic.copy_example, the format of
    data.copy_fraction documents), one row of ``data.seq_len``. Teacher-forced: the share of the
    tokens of every repeat after the first (not separators) that are the argmax. A model that
    cannot look back over the string's length scores near chance (1/36 per character)."""
    from trainer.data.synthetic import copy_example

    rng = random.Random(2468 + n_chars)  # not the training documents' seeds (trainer/data/mix.py)
    length = cfg.data.seq_len
    hits = torch.zeros(2, dtype=torch.float64)
    for _ in range(cfg.trainer.copy_samples):
        ids, spans = copy_example(tokenizer, n_chars, cfg.trainer.copy_repeats, rng)
        if len(ids) - 1 > length:
            raise ValueError(
                f"trainer.copy_lengths has {n_chars}: {cfg.trainer.copy_repeats} writings take {len(ids) - 1} "
                f"tokens, more than data.seq_len={length}"
            )
        hits += _hits(model, _one_row(ids[:-1], copy_labels(ids, spans), length), cfg, mesh, strategies).cpu()
    return (hits[0] / hits[1].clamp_min(1)).item()


def len_answer_tokens(tokenizer) -> int:
    return len(tokenizer.encode(" 12345."))


def evaluate(model, val_loader, tokenizer, cfg, mesh, strategies) -> dict:
    """Every configured evaluation, as flat metrics (module docstring)."""
    t = cfg.trainer
    model.eval()
    per_source = {}
    if t.eval_position_buckets:
        loss, edges, per = heldout_loss(model, val_loader, cfg, mesh, strategies, t.eval_position_buckets, per_source)
        out = {"val_loss": loss}
        out.update({f"val_loss@pos{lo}-{hi}": v for lo, hi, v in zip(edges, edges[1:], per)})
    else:
        out = {"val_loss": heldout_loss(model, val_loader, cfg, mesh, strategies, per_source=per_source)}
    out.update({f"val_loss/{name}": v for name, v in per_source.items()})  # a prepared-data mixture
    for length in t.passkey_lengths:
        if not t.passkey_depths:
            out[f"passkey@{length}"] = passkey_accuracy(model, tokenizer, length, cfg, mesh, strategies)
            continue
        cells = {d: passkey_accuracy(model, tokenizer, length, cfg, mesh, strategies, d) for d in t.passkey_depths}
        out[f"passkey@{length}"] = sum(cells.values()) / len(cells)
        out.update({f"passkey@{length}@{d:g}": v for d, v in cells.items()})
    for length in t.mqar_lengths:
        out[f"mqar@{length}"] = mqar_accuracy(model, tokenizer, length, cfg, mesh, strategies)
    for n_chars in t.copy_lengths:
        out[f"copy@{n_chars}"] = copy_accuracy(model, tokenizer, n_chars, cfg, mesh, strategies)
    out.update(kv_cache_bytes(cfg.model))  # inference memory (bf16): KV cache per token, fixed state
    model.train()
    return out


# --------------------------------------------------------------------------- entry point


def load_for_eval(path: str, overrides: list[str], world_size: int = 1):
    """(TrainConfig, Transformer) from a longctx run dir (its newest complete checkpoint and
    the settings of its stage) or a Hugging Face directory (its architecture, as ``init_from``
    builds it in training: trainer/init_from.py), ``key=value`` overrides on top.

    A run dir's CP size becomes the largest that divides ``world_size`` (a run trained with
    CP=2 evaluates on one process) unless ``parallel.cp.size`` is among the overrides; its
    engine (DeepSpeed, Accelerate) is not needed, and a GPU run evaluates on a machine without."""
    import math

    from omegaconf import OmegaConf

    from models import Transformer
    from trainer import init_from
    from trainer.config import TrainConfig, reject_unknown_keys

    drop = [o[1:].split("=")[0] for o in overrides if o.startswith("~")]  # Hydra's deletion: ~key
    extra = OmegaConf.from_dotlist([o for o in overrides if not o.startswith("~")])
    reject_unknown_keys(extra, TrainConfig, "")
    keys = override_keys(overrides)
    base = OmegaConf.structured(TrainConfig)
    if init_from.is_run_dir(path):
        from trainer.checkpoint import load_run_weights

        meta, state = load_run_weights(path)  # native or DeepSpeed
        saved = OmegaConf.create(meta.get("config", {}))
        saved.pop("recipe", None)
        saved.pop("init_from", None)  # the weights are the run's own
        for key in drop:  # e.g. ~model.mask_args.group: a saved dict entry the evaluation leaves out
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(saved, parent) if parent else saved
            if node is None or leaf not in node:
                raise ValueError(f"~{key}: the run's settings have no {key} to remove")
            node.pop(leaf)
        base = OmegaConf.merge(base, saved)
        cfg = OmegaConf.to_object(OmegaConf.merge(base, extra))
        if "trainer.device" not in keys and cfg.trainer.device == "cuda" and not torch.cuda.is_available():
            cfg.trainer.device = "auto"  # trained on GPUs, evaluated here
        cp = cfg.parallel.cp.size
        if "parallel.cp.size" not in keys and world_size % cp:
            cfg.parallel.cp.size = math.gcd(cp, world_size)
            if env_ranks()[0] == 0:
                print(
                    f"[longctx] {path} was trained with parallel.cp.size={cp}: evaluating with "
                    f"parallel.cp.size={cfg.parallel.cp.size} on {world_size} process(es) "
                    "(set parallel.cp.size to choose)",
                    flush=True,
                )
    else:
        from models.hf_io import load_hf_checkpoint

        cfg = OmegaConf.to_object(OmegaConf.merge(base, extra))
        cfg.init_from = path
        named = {k[len("model.") :] for k in keys if k.startswith("model.")}
        cfg = init_from.resolve(cfg, named=named)
        _, state = load_hf_checkpoint(path)
    cfg.recipe.stages = []
    cfg.trainer.engine = type(cfg.trainer.engine)()  # no engine evaluates: the plain model does
    model = Transformer(cfg.model)
    model.load_state_dict(state, strict=True)
    return cfg, model


def _plot(paths: list[str], out: str) -> None:
    """--plot: the summaries drawn together; without matplotlib one line naming the fix."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(
            "[longctx] error: --plot needs matplotlib, which is not installed: pip install -e '.[bench]' "
            "(or pip install matplotlib)",
            file=sys.stderr,
        )
        sys.exit(2)
    summaries = {}
    for p in paths:
        with open(p) as f:
            summaries[os.path.splitext(os.path.basename(p))[0]] = json.load(f)
    for f in plot_summaries(summaries, out):
        print(f)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="a run dir or Hugging Face dir, then key=value overrides")
    ap.add_argument("--out", default=None, help="output directory (default: PATH/eval)")
    ap.add_argument("--plot", action="store_true", help="paths are summary JSON files: plot them together")
    args = ap.parse_intermixed_args(argv)
    if args.plot:
        _plot(args.paths, args.out or ".")
        return
    path, overrides = args.paths[0], args.paths[1:]
    from parallel.mesh import init_mesh
    from trainer.batching import build_loaders
    from trainer.config import cp_strategies, validate

    try:
        cfg, model = load_for_eval(path, overrides, env_ranks()[2])
        validate(cfg, env_ranks()[2])
    except ValueError as e:
        print(f"[longctx] error: {e}", file=sys.stderr)
        sys.exit(2)
    strategies = cp_strategies(cfg)
    sizes = [u for s in strategies.values() for u in s.subgroup_sizes(cfg.parallel.cp.size, cfg.model.n_heads)]
    mesh = init_mesh(cfg.parallel.cp.size, cfg.trainer.device, sizes)
    _, val_loader, tokenizer = build_loaders(cfg, mesh)
    metrics = evaluate(model.to(mesh.device), val_loader, tokenizer, cfg, mesh, strategies)
    if mesh.is_main:
        out = args.out or os.path.join(path, "eval")
        name = os.path.basename(os.path.normpath(path))
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"source": name, **metrics}) + "\n")
        write_report(out, name, metrics)
        print(json.dumps(summarize(metrics), indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
