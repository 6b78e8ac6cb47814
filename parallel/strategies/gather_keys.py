"""Gather-keys strategy for kinds whose op is not a plain softmax (``landmark``): every rank
all-gathers K/V (one all-gather forward, one reduce-scatter of dK / dV backward, through
``allgather.Exchange``) and runs the kind's dense core on its local queries against the whole
row, so it is exact against the single-device op by construction.

Shapes: q [B, C, H, D], k, v [B, C, Hkv, D] (local shards) -> o [B, C, H, D].
"""

from __future__ import annotations

import torch

from models.landmark_attention import landmark_core
from parallel.strategies.allgather import Exchange, GatherKV
from parallel.strategies.base import LayerShape, Strategy, register


@register("gather_keys", default="landmark")
class GatherKeys(Strategy):
    kinds = ("landmark",)

    def __call__(self, q, k, v, ctx, *, every: int, scale=None):
        p = ctx.world_size
        ex = Exchange(ctx.group, ctx.rank, tuple(range(p)), tuple(r for r in range(p) if r != ctx.rank), True)
        kv = GatherKV.apply(torch.stack([k, v]), ex)  # [2, B, P * C, Hkv, D], ranks in order
        k_index = torch.cat([ctx.index_of(j) for j in range(p)])
        return landmark_core(
            q, kv[0], kv[1], ctx.local_index, ctx.local_doc, k_index, ctx.doc_of(k_index), every=every, scale=scale
        )

    def forward_bytes(self, shape: LayerShape) -> int:
        """The all-gather of K/V: (P - 1) chunks of [2, B, C, Hkv, D]."""
        s = shape
        return (s.cp - 1) * 2 * s.batch * (s.seq_len // s.cp) * s.n_kv_heads * s.head_dim * s.elem_bytes
