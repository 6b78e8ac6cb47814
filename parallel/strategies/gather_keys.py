"""Gather-keys strategies for kinds whose op is not a plain softmax (``landmark``,
``meta_window``). ``gather_keys``: every rank all-gathers K/V (one all-gather forward, one
reduce-scatter of dK / dV backward, through ``allgather.Exchange``) and runs the kind's dense
core on its local queries against the whole row: exact against the single-device op by
construction.

``gather_window``: each rank receives only the chunks its queries' windows reach (the
allgather strategy's need matrix) and adds the meta tokens, which it holds whole: their K/V
are replicated parameters, never sharded (``meta_tokens``).

Shapes: q [B, C, H, D], k, v [B, C, Hkv, D] (local shards) -> o [B, C, H, D].
"""

from __future__ import annotations

import torch

from models.landmark_attention import landmark_core
from models.lizard_attention import meta_window_core
from parallel.strategies.allgather import Exchange, GatherKV, need_matrix
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


def meta_tokens(meta: torch.Tensor, ctx) -> torch.Tensor:
    """The meta tokens [M, Hkv, D] this rank attends to: all of them (replicated)."""
    return meta


@register("gather_window", default="meta_window")
class GatherWindow(Strategy):
    kinds = ("meta_window",)

    def __call__(self, q, k, v, ctx, *, window: int, meta_k, meta_v, scale=None):
        p, me = ctx.world_size, ctx.rank
        need = need_matrix(ctx, True, window)
        sources = tuple(j for j in range(p) if need[me][j])
        ex = Exchange(ctx.group, me, sources, tuple(r for r in range(p) if r != me and need[r][me]), False)
        kv = GatherKV.apply(torch.stack([k, v]), ex)  # [2, B, S * C, Hkv, D]
        k_index = torch.cat([ctx.index_of(j) for j in sources])
        mk, mv = meta_tokens(meta_k, ctx), meta_tokens(meta_v, ctx)
        return meta_window_core(
            q,
            kv[0],
            kv[1],
            ctx.local_index,
            ctx.local_doc,
            k_index,
            ctx.doc_of(k_index),
            window=window,
            meta_k=mk,
            meta_v=mv,
            scale=scale,
        )

    def forward_bytes(self, shape: LayerShape) -> int:
        """At most the all-gather of K/V (a window shorter than a chunk: one or two chunks)."""
        s = shape
        return (s.cp - 1) * 2 * s.batch * (s.seq_len // s.cp) * s.n_kv_heads * s.head_dim * s.elem_bytes
