"""Llama-style decoder with a per-layer choice of token mixer.

Inputs: input_ids [B, T], positions [B, T] (position inside each document), and the
attention context ``ctx`` (models.context / parallel.context). T is the local length:
under context parallelism each rank holds its shard of the row and ``ctx`` knows where
those tokens sit in the global sequence. Output: logits [B, T, vocab]; or, given labels
[B, T] (-100: no loss), the next-token cross-entropy summed over the labelled tokens (fp32
scalar), through the loss head ``loss_head`` (models/ops/cross_entropy.py; full logits unless
the trainer applies a chunked head from outside, trainer/parallelize.py, as it applies
activation checkpointing).
"""

from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from models.context import SingleDeviceContext
from models.layers import RMSNorm, SwiGLU
from models.mixers import build_mixer
from models.ops.cross_entropy import linear_cross_entropy
from models.rope import Rotary


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.mixer_name = cfg.mixer_of(layer)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mixer = build_mixer(self.mixer_name, cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn)

    def forward(self, x, cos, sin, ctx):
        x = x + self.mixer(self.attn_norm(x), cos, sin, ctx)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.rotary = Rotary(cfg.rope, cfg.hd)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.loss_head = linear_cross_entropy  # (h [N, dim], weight [V, dim], labels [N]) -> loss sum
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None):
        g = None if seed is None else torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith(("q_map.weight", "k_map.weight")):
                continue  # learnable feature maps keep their own (identity) initialisation
            if p.dim() == 1:
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
            else:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * self.cfg.init_std)

    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        ctx=None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t = input_ids.shape
        if positions is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        if ctx is None:
            ctx = SingleDeviceContext(b, t)
        x = self.embed(input_ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for block in self.layers.values():
            x = block(x, cos, sin, ctx)
        if labels is None:
            return nn.functional.linear(self.norm(x), self.head_weight())
        h = self.norm(x).flatten(0, 1)
        return self.loss_head(h, self.head_weight(), labels.flatten())
