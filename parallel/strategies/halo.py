"""Halo exchange for the ``delay`` kind (models/hybrid_attention.py): each rank receives the
chunks that hold the tokens ``delay`` positions before its own, then picks them.

Shapes: v [B, C, H, F] (local shard) -> [B, C, H, F], the token ``delay`` positions earlier in
the same document (zeros where there is none). Sources of rank r: every rank holding a position
p - delay for one of r's positions p (contiguous layout and delay <= C: rank r - 1; zigzag: up
to two more), exchanged point to point, backward returning each slice's gradient to its owner
(``allgather.Exchange``, exact). Whole chunks travel, not only their last ``delay`` tokens.
"""

from __future__ import annotations

import torch

from models.hybrid_attention import delayed
from parallel.strategies.allgather import Exchange, GatherKV
from parallel.strategies.base import LayerShape, Strategy, register


def delay_sources(ctx, delay: int) -> list[set[int]]:
    """sources[r]: the ranks whose chunks hold a position ``delay`` before one of rank r's
    (and r itself); identical on every rank."""
    p = ctx.world_size
    owner = torch.empty(ctx.seq_len, dtype=torch.int64)
    for r in range(p):
        owner[ctx.index_of(r)] = r
    out = []
    for r in range(p):
        before = ctx.index_of(r) - delay
        out.append({r, *owner[before[before >= 0]].tolist()})
    return out


@register("halo", default="delay")
class Halo(Strategy):
    kinds = ("delay",)

    def __call__(self, q, k, v, ctx, *, delay: int):
        need = delay_sources(ctx, delay)
        me = ctx.rank
        sources = tuple(sorted(need[me]))
        targets = tuple(r for r in range(ctx.world_size) if r != me and me in need[r])
        ex = Exchange(ctx.group, me, sources, targets, False)
        got = GatherKV.apply(v[None], ex)[0]  # [B, S * C, H, F]
        src_index = torch.cat([ctx.index_of(j) for j in sources])
        return delayed(got, src_index, ctx.doc_of(src_index), ctx.local_index, ctx.local_doc, delay, ctx.seq_len)

    def forward_bytes(self, shape: LayerShape) -> int:
        """At most two neighbouring chunks (zigzag; one for contiguous) of the delayed tensor,
        counted here as [B, C, H, head_dim] per chunk."""
        s = shape
        chunks = min(s.cp - 1, 1 if s.layout == "contiguous" else 2)
        return chunks * s.batch * (s.seq_len // s.cp) * s.n_heads * s.head_dim * s.elem_bytes
