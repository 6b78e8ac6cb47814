"""Data-driven masks under context parallelism: a packed prompt/completion batch (trainer/data/sft.py)
under data.mask=prefix_lm / shared_question gives, under every softmax CP strategy at world 2 and
both layouts, the loss and gradients of the same model on one rank (fp64), through the trainer's
own path (segment_mask on the global batch, then shard_batch, then the context)."""

import pytest
import torch
import torch.distributed as dist

from models import ModelConfig, Transformer
from models.ops.attention.segments import segment_mask
from parallel.context import CPContext
from parallel.mesh import build_subgroups
from parallel.sharding import shard_batch
from parallel.spawn import run_distributed
from parallel.strategies import build_strategy
from trainer.data import ByteTokenizer, collate
from trainer.data.sft import SFTPacked, generated_examples

pytestmark = pytest.mark.gloo

N = 72  # 18 tokens per zigzag chunk at world 2: no kernel block (16) divides it
STRATEGIES = [("allgather", {}), ("ring", {}), ("ulysses", {}), ("usp", {}), ("cad", {"min_shard": 4})]


def _batch(mask):
    ds = SFTPacked(generated_examples(12, seed=1), ByteTokenizer(), N, mask, seed=2)
    return collate([ds.next_row() for _ in range(2)])


def _loss_and_grads(rank, world, masks):
    out = []
    group = dist.group.WORLD if world > 1 else None
    for mask_name in masks:
        batch = _batch(mask_name)
        mask = segment_mask(mask_name, batch)  # global: every rank the same
        for name, options in STRATEGIES if world > 1 else [("local", {})]:
            for layout in ("contiguous", "zigzag"):
                torch.manual_seed(0)
                model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2)).double()
                strat = build_strategy(name, **options)
                sizes = strat.subgroup_sizes(world, 4) if world > 1 else []
                subgroups = build_subgroups(group, world, sizes) if sizes else {}
                local = shard_batch(batch, rank, world, layout)
                ctx = CPContext(strat, group, rank, world, layout, N, 2, batch["cu_seqlens"], 16, subgroups, mask)
                logits = model(local["input_ids"], local["positions"], ctx)
                ce = torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), local["labels"].flatten(), reduction="sum", ignore_index=-100
                )
                ce.backward()
                grads = torch.cat([p.grad.flatten() for p in model.parameters()])
                stats = torch.cat([ce.detach()[None], grads])
                if world > 1:
                    dist.all_reduce(stats)
                out.append((mask_name, name, layout, stats))
    return out


def test_data_masks_under_cp2_match_one_rank():
    masks = ("prefix_lm", "shared_question")
    ref = {
        m: s
        for m, _, layout, s in run_distributed(_loss_and_grads, 1, masks + ("causal",))[0]
        if layout == "contiguous"
    }
    assert abs(ref["prefix_lm"][0] - ref["causal"][0]) > 1e-3  # the same rows: the mask reached the model
    worst = 0.0
    for per_rank in run_distributed(_loss_and_grads, 2, masks, timeout=600):
        for mask_name, name, layout, stats in per_rank:
            err = (stats - ref[mask_name]).abs().max().item()
            assert err < 1e-9, (mask_name, name, layout, err)
            worst = max(worst, err)
    print(f"data masks under CP=2, every strategy and layout: max |loss, grad error| {worst:.2e}")
