"""The interface every context-parallel attention strategy implements."""
from __future__ import annotations

from parallel.sharding import check_divisible

STRATEGIES: dict[str, type] = {}


def register(name: str):
    def wrap(cls):
        cls.name = name
        STRATEGIES[name] = cls
        return cls
    return wrap


class Strategy:
    """attention(q [B, C, H, D], k, v [B, C, Hkv, D], ctx) -> o [B, C, H, D], exact in
    forward and backward against single-device attention on the unsharded row."""

    name = "base"
    layouts = ("contiguous", "zigzag")

    def check(self, *, n_heads: int, n_kv_heads: int, cp: int, seq_len: int, layout: str) -> None:
        """Raise ValueError (naming the setting and the fix) before any collective runs."""
        if layout not in self.layouts:
            raise ValueError(f"parallel.cp.layout={layout!r} is not supported by strategy "
                             f"{self.name!r}: choose one of {self.layouts}")
        check_divisible(seq_len, cp, layout)

    def attention(self, q, k, v, ctx, *, causal=True, window=None, scale=None):
        raise NotImplementedError(f"strategy {self.name!r} has no softmax attention: set "
                                  "parallel.cp.strategy to a softmax strategy (allgather, ring, ...)")

    def linear_attention(self, q, k, v, ctx, *, g=None, gk=None, scale=1.0, **options):
        """Linear attention over the local shard; q, k [B, C, H, Dk], v [B, C, H, Dv].
        Softmax strategies only serve it on a CP world of 1; LASP strategies override it."""
        if ctx.world_size > 1:
            raise NotImplementedError(
                f"strategy {self.name!r} cannot run linear attention across {ctx.world_size} ranks: "
                "set parallel.cp.linear_strategy=lasp2")
        from models.ops.linear_attention import doc_linear_attention
        return doc_linear_attention(q, k, v, ctx.local_doc, g, gk, scale, **options)

    def work_queries(self, ctx, n_heads: int):
        """(global row positions of the queries this rank computes attention for, fraction of
        the heads it computes them for). Sequence-sharded strategies: (local_index, 1.0);
        head-sharded ones (Ulysses) override it. Used to measure compute balance."""
        return ctx.local_index, 1.0

    def forward_bytes(self, *, batch: int, seq_len: int, cp: int, n_heads: int, n_kv_heads: int,
                      head_dim: int, elem_bytes: int) -> int:
        """Bytes one rank receives in one layer's forward, by the strategy's formula."""
        raise NotImplementedError


def build_strategy(name: str, **options) -> Strategy:
    """The strategy ``name`` built with its options (``parallel.cp.options``)."""
    if name not in STRATEGIES:
        raise ValueError(f"parallel.cp.strategy={name!r} is unknown: choose one of {sorted(STRATEGIES)}")
    import inspect
    accepted = set(inspect.signature(STRATEGIES[name].__init__).parameters) - {"self"}
    unknown = set(options) - accepted
    if unknown:
        raise ValueError(f"parallel.cp.options has {sorted(unknown)}, which strategy {name!r} does not "
                         f"take: its options are {sorted(accepted) or 'none'}")
    return STRATEGIES[name](**options)
