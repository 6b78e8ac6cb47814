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


def build_context(strategy, group, rank: int, world_size: int, layout: str, batch: dict,
                  block: int = 256) -> CPContext:
    """Context for one (already sharded) batch; see parallel.sharding.shard_batch."""
    return CPContext(strategy, group, rank, world_size, layout, int(batch["seq_len"]),
                     batch["input_ids"].shape[0], batch["cu_seqlens"], block)
