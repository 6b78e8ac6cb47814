"""From loader rows to what the model sees: device transfer, CP sharding, context, loss."""

from __future__ import annotations

import torch
import torch.distributed as dist

from models.ops.attention.segments import segment_mask
from parallel.context import build_context
from parallel.sharding import shard_batch


def build_loaders(cfg, mesh):
    """Train and validation loaders for this rank's data-parallel shard, and the tokenizer.
    Every CP rank of a dp group reads the same rows (it keeps its own shard of each)."""
    from trainer.data import DataLoaderShard, PackedDataset, StdlibSource, TextFilesSource, build_tokenizer
    from trainer.data.mix import MixedSource

    d = cfg.data
    tokenizer = build_tokenizer(d.tokenizer, d.tokenizer_path)
    if d.source == "sft":  # prompt/completion examples, whole units, loss on completions
        from trainer.data.sft import build_sft_datasets

        train, val = build_sft_datasets(d, tokenizer)
        return (
            DataLoaderShard(train, mesh.dp_rank, mesh.dp, d.micro_batch),
            DataLoaderShard(val, mesh.dp_rank, mesh.dp, d.micro_batch),
            tokenizer,
        )
    if d.source == "prepared":  # memory-mapped shards (python -m trainer.prepare)
        from trainer.data.prepared import build_prepared_loaders

        train, val = build_prepared_loaders(d, tokenizer, mesh.dp_rank, mesh.dp)
        return train, val, tokenizer

    def source(split):
        if d.source == "stdlib":
            src = StdlibSource(split=split, val_fraction=d.val_fraction)
        else:
            src = TextFilesSource(list(d.paths), split=split, val_fraction=d.val_fraction)
        if split == "train" and (
            d.long_ratio is not None or max(d.passkey_fraction, d.mqar_fraction, d.copy_fraction) > 0
        ):
            src = MixedSource(  # val stays natural
                src,
                d.long_min_chars,
                d.long_ratio,
                d.passkey_fraction,
                list(d.passkey_doc_chars),
                d.seed,
                d.mqar_fraction,
                list(d.mqar_doc_chars),
                d.mqar_pairs,
                d.copy_fraction,
                list(d.copy_doc_chars),
                list(d.copy_repeats),
                d.passkey_edge_fraction,
            )
        return src

    def rows(split, seed):
        if d.packing == "stream":
            return PackedDataset(source(split), tokenizer, d.seq_len, seed)
        from trainer.data.planned import PlannedDataset  # documents whole (best_fit / grouped)

        return PlannedDataset(source(split), tokenizer, d.seq_len, seed, d.packing, mesh.dp * d.micro_batch)

    train = DataLoaderShard(rows("train", d.seed), mesh.dp_rank, mesh.dp, d.micro_batch)
    val = DataLoaderShard(rows("val", d.seed + 1), mesh.dp_rank, mesh.dp, d.micro_batch)
    return train, val, tokenizer


def data_metrics(loader) -> dict:
    """What the data loader reports for the log (prepared data: the realised token share of each
    source, the padding share, the share of documents cut); {} for the text loaders."""
    return loader.metrics() if hasattr(loader, "metrics") else {}


def prepare_batch(batch: dict, cfg, mesh, strategies: dict):
    """Shard a [B, N] batch for this CP rank and build the attention context
    (``strategies``: {mixer kind: strategy}, trainer.config.cp_strategies). The data mask
    (data.mask) comes from the batch's global segments, the same on every CP rank."""
    cp = cfg.parallel.cp
    # probe rows (trainer/evaluate.py: passkey, MQAR) carry no segments: plain causal documents
    mask = segment_mask(cfg.data.mask, batch) if "segments" in batch else None
    local = shard_batch(batch, mesh.cp_rank, mesh.cp, cp.layout)
    for key in ("input_ids", "labels", "positions"):
        local[key] = local[key].to(mesh.device, non_blocking=True)
    ctx = build_context(
        strategies,
        mesh.cp_group if mesh.cp > 1 else None,
        mesh.cp_rank,
        mesh.cp,
        cp.layout,
        local,
        cp.block,
        mesh.subgroups,
        mask,
    )
    return local, ctx


def batch_loss(ce: torch.Tensor, labels: torch.Tensor, mesh, group=None):
    """``ce``: the cross-entropy summed over this rank's tokens (the model's output given the
    labels), scaled so that DP averaging of gradients over all ranks yields the gradient of
    the global mean. Returns (loss to backprop, global CE sum, global token count) -- the last
    two as Python numbers."""
    stats = torch.stack([ce.detach(), (labels != -100).sum().to(ce.dtype)])
    dist.all_reduce(stats, group=group)
    ce_sum, count = stats.tolist()
    world = dist.get_world_size(group)
    return ce * world / max(count, 1.0), ce_sum, int(count)
