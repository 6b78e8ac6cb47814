"""The context-parallel context: the one object the model's mixers see under CP.

It carries the CP group, the strategy, the sharding layout, the global document
boundaries (``cu_seqlens`` over the flattened [B * N] batch) and where this rank's
tokens sit in the global row (``local_index`` [C]). Mixers call ``ctx.attention``
exactly as they do on one device (models/context.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from models.ops.attention import doc_ids
from parallel.sharding import local_index as layout_index


@dataclass
class CPContext:
    strategy: object                 # a parallel.strategies.base.Strategy
    group: object | None             # torch.distributed ProcessGroup (None for a world of 1)
    rank: int
    world_size: int
    layout: str
    seq_len: int                     # N, the global row length
    batch_size: int                  # B
    cu_seqlens: torch.Tensor         # [n_docs + 1] document starts over the flattened batch
    block: int = 256
    linear_strategy: object | None = None   # strategy of linear-attention layers (LASP-2H)
    local_index: torch.Tensor = field(init=False)   # [C]
    local_doc: torch.Tensor = field(init=False)     # [B, C]

    def __post_init__(self):
        self.cu_seqlens = self.cu_seqlens.detach().to("cpu", torch.int64)
        self.local_index = self.index_of(self.rank)
        self.local_doc = self.doc_of(self.local_index)

    def index_of(self, rank: int) -> torch.Tensor:
        """Global row positions held by CP rank ``rank``. [C]"""
        return layout_index(self.seq_len, rank, self.world_size, self.layout)

    def doc_of(self, index: torch.Tensor) -> torch.Tensor:
        """Document ids [B, T] of row positions ``index`` [T] in every batch row."""
        flat = torch.arange(self.batch_size)[:, None] * self.seq_len + index[None, :]
        return doc_ids(self.cu_seqlens, flat)

    def attention(self, q, k, v, *, causal=True, window=None, scale=None):
        """q [B, C, H, D], k, v [B, C, Hkv, D] (local shards) -> o [B, C, H, D]."""
        return self.strategy.attention(q, k, v, self, causal=causal, window=window, scale=scale)

    def linear_attention(self, q, k, v, *, g=None, gk=None, scale=1.0, **options):
        """q, k [B, C, H, Dk], v [B, C, H, Dv], g [B, C, H], gk [B, C, H, Dk] (local shards)
        -> o [B, C, H, Dv], by the linear-attention strategy (LASP-2 under CP)."""
        strategy = self.linear_strategy or self.strategy
        return strategy.linear_attention(q, k, v, self, g=g, gk=gk, scale=scale, **options)


def build_context(strategy, group, rank: int, world_size: int, layout: str, batch: dict,
                  block: int = 256, linear_strategy=None) -> CPContext:
    """Context for one (already sharded) batch; see parallel.sharding.shard_batch."""
    return CPContext(strategy, group, rank, world_size, layout, int(batch["seq_len"]),
                     batch["input_ids"].shape[0], batch["cu_seqlens"], block, linear_strategy)
