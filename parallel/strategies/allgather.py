"""All-gather KV (Llama-3 style): one all-gather of K and V per layer, local queries
attend to the gathered keys with the global document / causal / window mask; the
backward reduce-scatters dK and dV back to their owners.

Receives (P-1) * 2 * B * C * Hkv * D * e bytes per rank per layer in forward.
"""
from __future__ import annotations

import torch

from models.ops.attention import MaskSpec, attention
from parallel import comm
from parallel.strategies.base import Strategy, register


class GatherSequence(torch.autograd.Function):
    """x [..., C, ...] on each rank -> cat over ranks along ``dim`` (rank order);
    backward: reduce-scatter of the gradient."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim, ctx.c = group, dim, x.shape[dim]
        return torch.cat(comm.all_gather(x, group), dim=dim)

    @staticmethod
    def backward(ctx, g):
        chunks = list(g.split(ctx.c, dim=ctx.dim))
        return comm.reduce_scatter(chunks, ctx.group), None, None


@register("allgather")
class AllGatherKV(Strategy):
    def attention(self, q, k, v, ctx, *, causal=True, window=None, scale=None):
        if ctx.world_size == 1:
            kv_index = ctx.local_index
            kv = torch.stack([k, v])
        else:
            kv = GatherSequence.apply(torch.stack([k, v]), ctx.group, 2)   # [2, B, P*C, Hkv, D]
            kv_index = torch.cat([ctx.index_of(r) for r in range(ctx.world_size)])
        mask = MaskSpec(ctx.local_index, kv_index, ctx.local_doc, ctx.doc_of(kv_index), causal, window)
        return attention(q, kv[0], kv[1], mask, scale, ctx.block)[0]

    def forward_bytes(self, *, batch, seq_len, cp, n_kv_heads, head_dim, elem_bytes, n_heads=None) -> int:
        return (cp - 1) * 2 * batch * (seq_len // cp) * n_kv_heads * head_dim * elem_bytes
