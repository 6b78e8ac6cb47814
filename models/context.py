"""The attention context: how a token mixer reaches its core attention.

A mixer never knows whether it runs on one device or under context parallelism: it
calls ``ctx.attention(q, k, v, causal=..., window=..., scale=...)`` with its *local*
tokens, shapes ``q [B, T, H, D]``, ``k, v [B, T, Hkv, D]``, and gets ``o [B, T, H, D]``.
Linear-attention mixers call ``ctx.linear_attention(q, k, v, g=..., gk=..., scale=...)``
the same way. The single-device context lives here; context-parallel ones are built in
``parallel/`` and follow the same protocol.
"""
from __future__ import annotations

from typing import Protocol

import torch

from models.ops.attention import MaskSpec, attention, doc_ids
from models.ops.linear_attention import doc_linear_attention


class AttentionContext(Protocol):
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                  window: int | None = None, scale: float | None = None) -> torch.Tensor: ...

    def linear_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, g=None, gk=None,
                         scale: float = 1.0, **options) -> torch.Tensor: ...


class SingleDeviceContext:
    """All tokens on one device. ``cu_seqlens`` holds the document start offsets of the
    flattened batch ([B * T] tokens, ending with B * T); None means one document per row."""

    def __init__(self, batch_size: int, seq_len: int, cu_seqlens: torch.Tensor | None = None,
                 block: int = 256):
        if cu_seqlens is None:
            cu_seqlens = torch.arange(0, batch_size * seq_len + 1, seq_len)
        self.block = block
        pos = torch.arange(seq_len)
        flat = torch.arange(batch_size)[:, None] * seq_len + pos[None, :]
        self.pos = pos
        self.doc = doc_ids(cu_seqlens.cpu(), flat)

    def mask(self, causal: bool, window: int | None) -> MaskSpec:
        return MaskSpec(self.pos, self.pos, self.doc, self.doc, causal, window)

    def attention(self, q, k, v, *, causal=True, window=None, scale=None):
        o, _ = attention(q, k, v, self.mask(causal, window), scale, self.block)
        return o

    def linear_attention(self, q, k, v, *, g=None, gk=None, scale=1.0, **options):
        """q, k [B, T, H, Dk], v [B, T, H, Dv], g [B, T, H], gk [B, T, H, Dk] -> o [B, T, H, Dv]."""
        return doc_linear_attention(q, k, v, self.doc, g, gk, scale, **options)
