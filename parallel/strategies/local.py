"""The local strategy: a CP world of 1, attention over the whole row on this device."""
from __future__ import annotations

from models.ops.attention import MaskSpec, attention
from parallel.strategies.base import Strategy, register


@register("local")
class Local(Strategy):
    def check(self, *, cp, **kw):
        super().check(cp=cp, **kw)
        if cp != 1:
            raise ValueError(f"parallel.cp.strategy=local needs parallel.cp.size=1 (got {cp}): "
                             "pick a context-parallel strategy such as allgather")

    def attention(self, q, k, v, ctx, *, causal=True, window=None, scale=None):
        mask = MaskSpec(ctx.local_index, ctx.local_index, ctx.local_doc, ctx.local_doc, causal, window)
        return attention(q, k, v, mask, scale, ctx.block)[0]

    def forward_bytes(self, **kw) -> int:
        return 0
