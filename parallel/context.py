"""The context-parallel context: the one object the model's mixers see under CP.

It carries the CP group, one strategy per mixer kind (``{"softmax": ring, "linear": lasp2}``:
LASP-2H is a hybrid model under one CP group and one layout), the sharding layout, the global
document boundaries (``cu_seqlens`` over the flattened [B * N] batch) and where this rank's
tokens sit in the global row. Mixers call ``ctx.run(kind, ...)`` exactly as on one device
(models/context.py); a CP world of one runs every kind's single-device op.

Per batch, once: ``docs`` (models.ops.documents.Documents of the local tokens: row positions
``local_index`` [C], document ids ``local_doc`` [B, C], document starts at global positions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from models.context import AttentionContext
from models.ops.documents import Documents, row_doc_ids
from parallel.sharding import local_index as layout_index


@dataclass
class CPContext(AttentionContext):
    strategies: dict  # mixer kind -> parallel.strategies.base.Strategy
    group: object | None  # torch.distributed ProcessGroup (None for a world of 1)
    rank: int
    world_size: int
    layout: str
    seq_len: int  # N, the global row length
    batch_size: int  # B
    cu_seqlens: torch.Tensor  # [n_docs + 1] document starts over the flattened batch
    block: int = 256
    subgroups: dict = field(default_factory=dict)  # sub-meshes built at start-up (parallel.mesh)
    # the batch's data mask (data.mask: models/ops/attention/segments.py), from the global segments
    # every rank holds whole; softmax layers without a mask of their own use it
    batch_mask: object | None = None
    docs: Documents = field(init=False)

    def __post_init__(self):
        from parallel.strategies.base import Strategy

        if isinstance(self.strategies, Strategy):  # one strategy: it serves its own kind
            self.strategies = self.strategies.serves()
        self.cu_seqlens = self.cu_seqlens.detach().to("cpu", torch.int64)
        self.docs = Documents.of(self.cu_seqlens, self.batch_size, self.seq_len, self.index_of(self.rank))

    @property
    def local_index(self) -> torch.Tensor:
        """Global row positions of this rank's tokens. [C]"""
        return self.docs.index

    @property
    def local_doc(self) -> torch.Tensor:
        """Document ids of this rank's tokens. [B, C]"""
        return self.docs.doc

    def index_of(self, rank: int) -> torch.Tensor:
        """Global row positions held by CP rank ``rank``. [C]"""
        return layout_index(self.seq_len, rank, self.world_size, self.layout)

    def doc_of(self, index: torch.Tensor) -> torch.Tensor:
        """Document ids [B, T] of row positions ``index`` [T] in every batch row."""
        return row_doc_ids(self.cu_seqlens, self.batch_size, self.seq_len, index)

    def run(self, kind: str, q, k, v, **options) -> torch.Tensor:
        """The core op of mixer kind ``kind`` on the local shards (see models/context.py)."""
        self._check_shapes(q, k, v)
        if self.world_size == 1:
            return super().run(kind, q, k, v, **options)
        strategy = self.strategies.get(kind)
        if strategy is None:
            raise ValueError(
                f"no context-parallel strategy serves mixer kind {kind!r}: set "
                f"parallel.cp.strategies.{kind} (this context has "
                f"{ {k: s.name for k, s in self.strategies.items()} })"
            )
        return strategy(q, k, v, self, **self.bind(options, kind))

    def _check_shapes(self, q, k, v) -> None:
        """Local shards must hold exactly this rank's C tokens of each of the B rows."""
        want = (self.batch_size, len(self.local_index))
        for name, x in (("q", q), ("k", k), ("v", v)):
            if x.dim() != 4 or tuple(x.shape[:2]) != want:
                raise ValueError(
                    f"{name} has shape {tuple(x.shape)} but the context holds [B={want[0]}, "
                    f"C={want[1]}, heads, dim] per rank (seq_len={self.seq_len} over "
                    f"{self.world_size} ranks): shard the batch with the same layout and size"
                )


def build_context(
    strategies: dict,
    group,
    rank: int,
    world_size: int,
    layout: str,
    batch: dict,
    block: int = 256,
    subgroups: dict | None = None,
    batch_mask=None,
) -> CPContext:
    """Context for one (already sharded) batch; see parallel.sharding.shard_batch.
    ``batch_mask``: the batch's data mask (models/ops/attention/segments.py), or None."""
    return CPContext(
        strategies,
        group,
        rank,
        world_size,
        layout,
        int(batch["seq_len"]),
        batch["input_ids"].shape[0],
        batch["cu_seqlens"],
        block,
        subgroups or {},
        batch_mask,
    )
