"""Evaluation: held-out loss and passkey retrieval accuracy by context length."""

from __future__ import annotations

import copy
import random

import torch
import torch.distributed as dist

from trainer.batching import batch_loss, prepare_batch


@torch.no_grad()
def heldout_loss(model, loader, cfg, mesh, strategies) -> float:
    start = copy.deepcopy(loader.state_dict())  # every evaluation sees the same rows
    it = iter(loader)
    ce, count = 0.0, 0
    for _ in range(cfg.trainer.eval_batches):
        batch, ctx = prepare_batch(next(it), cfg, mesh, strategies)
        logits = model(batch["input_ids"], batch["positions"], ctx)
        _, s, c = batch_loss(logits, batch["labels"], mesh)
        ce, count = ce + s, count + c
    loader.load_state_dict(start)
    return ce / max(count, 1)


@torch.no_grad()
def passkey_accuracy(model, tokenizer, length: int, cfg, mesh, strategies) -> float:
    """Teacher-forced: an example is correct when every answer token is the argmax."""
    from trainer.data import passkey_example

    rng = random.Random(1234 + length)
    n, correct = cfg.trainer.passkey_samples, 0
    for i in range(n):
        depth = (i + 0.5) / n
        ids, answer = passkey_example(tokenizer, length - len_answer_tokens(tokenizer), depth, rng)
        full = ids + answer
        inputs, labels = torch.tensor(full[:-1]), torch.full((len(full) - 1,), -100)
        labels[len(ids) - 1 :] = torch.tensor(answer)
        inputs = torch.cat([inputs, torch.zeros(length - len(inputs), dtype=torch.long)])
        labels = torch.cat([labels, torch.full((length - len(labels),), -100)])
        batch = {
            "input_ids": inputs[None],
            "labels": labels[None],
            "positions": torch.arange(length)[None],
            "cu_seqlens": torch.tensor([0, length]),
        }
        batch, ctx = prepare_batch(batch, cfg, mesh, strategies)
        logits = model(batch["input_ids"], batch["positions"], ctx)
        mask = batch["labels"] != -100
        hits = torch.stack([(logits.argmax(-1)[mask] == batch["labels"][mask]).sum(), mask.sum()]).float()
        if mesh.cp > 1:
            dist.all_reduce(hits, group=mesh.cp_group)
        correct += int(hits[0] == hits[1])
    return correct / n


def len_answer_tokens(tokenizer) -> int:
    return len(tokenizer.encode(" 12345."))


def evaluate(model, val_loader, tokenizer, cfg, mesh, strategies) -> dict:
    model.eval()
    out = {"val_loss": heldout_loss(model, val_loader, cfg, mesh, strategies)}
    for length in cfg.trainer.passkey_lengths:
        out[f"passkey@{length}"] = passkey_accuracy(model, tokenizer, length, cfg, mesh, strategies)
    model.train()
    return out
