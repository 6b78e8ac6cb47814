"""What the trainer applies to a plain model from outside, before an engine wraps it (the model
file knows nothing of it): activation checkpointing of every block, and the loss head.

    apply_activation_checkpointing(model)        # trainer.activation_checkpointing
    apply_loss_head(model, chunk_tokens)         # trainer.loss_chunk_tokens

Parameter names stay as they are (checkpoints, ``train_params`` patterns and LoRA targets
match them): a block's ``forward`` is wrapped, not the block.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from models.ops.cross_entropy import linear_cross_entropy


def apply_activation_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """Recompute each block's activations in backward instead of keeping them (non-reentrant
    ``torch.utils.checkpoint``), while the block trains with gradients on; returns ``model``."""
    for block in model.layers.values():
        block.forward = _checkpointed(block, block.forward)
    return model


def _checkpointed(block: torch.nn.Module, forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if block.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


def apply_loss_head(model: torch.nn.Module, chunk_tokens: int) -> torch.nn.Module:
    """The model's loss head (final hidden states [N, dim], head weight [V, dim], labels [N] ->
    summed cross-entropy): ``chunk_tokens`` > 0 computes it that many tokens at a time without the
    [N, V] logits (models/ops/cross_entropy.py, exact), 0 through full logits; returns ``model``."""
    model.loss_head = functools.partial(linear_cross_entropy, chunk=chunk_tokens)
    return model
