"""The interface every context-parallel strategy implements, one base per mixer kind.

A strategy serves one mixer kind (``softmax``, ``linear``, ...) across the ranks of a CP
group; ``CPContext.run(kind, ...)`` calls ``strategy(q, k, v, ctx, **options)`` with the
local shards and the kind's options (models/context.py lists them). A CP world of one never
reaches a strategy: the context runs the kind's single-device op (models/registry.py).

Registering: ``@register("name")`` on a subclass of the kind's base (``SoftmaxStrategy``,
``LinearStrategy``); ``default=True`` makes it the kind's default when ``parallel.cp.strategies``
does not name one. Every strategy states the bytes one rank receives in one layer's forward
by its formula, ``forward_bytes(LayerShape)``, which the tests and benchmarks check against
the bytes ``parallel.comm`` counts.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from parallel.sharding import check_divisible

STRATEGIES: dict[str, type] = {}  # name -> class (its ``kind`` says what it serves)
DEFAULTS: dict[str, str] = {}  # mixer kind -> default strategy name


def register(name: str, default: bool = False):
    def wrap(cls):
        cls.name = name
        STRATEGIES[name] = cls
        if default:
            DEFAULTS[cls.kind] = name
        return cls

    return wrap


@dataclass(frozen=True)
class LayerShape:
    """One layer's core-op shape under CP, for byte formulas. N = seq_len is the global row;
    heads are those of q (n_heads) and k/v (n_kv_heads; linear mixers: = n_heads);
    key_dim: Dk of linear attention when it differs from head_dim (hedgehog feature map)."""

    batch: int
    seq_len: int
    cp: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    elem_bytes: int = 4
    layout: str = "zigzag"
    key_dim: int | None = None


class Strategy:
    """Base of all strategies. Subclasses set ``kind`` (via their kind's base) and implement
    ``__call__`` and ``forward_bytes``."""

    name = "base"
    kind: str | None = None
    layouts = ("contiguous", "zigzag")

    def serves(self) -> dict:
        """{kind: self}: what a context built from this strategy alone routes to it."""
        return {} if self.kind is None else {self.kind: self}

    def check(self, *, n_heads: int, n_kv_heads: int, cp: int, seq_len: int, layout: str) -> None:
        """Raise ValueError (naming the setting and the fix) before any collective runs."""
        if layout not in self.layouts:
            raise ValueError(
                f"parallel.cp.layout={layout!r} is not supported by strategy "
                f"{self.name!r}: choose one of {self.layouts}"
            )
        check_divisible(seq_len, cp, layout)

    def subgroup_sizes(self, cp: int, n_heads: int) -> list[int]:
        """Sizes of the sub-groups of the CP group this strategy needs (built once at
        start-up by ``parallel.mesh.build_subgroups``); none by default."""
        return []

    def __call__(self, q, k, v, ctx, **options):
        raise NotImplementedError

    def work_queries(self, ctx, n_heads: int):
        """(global row positions of the queries this rank computes attention for, fraction of
        the heads it computes them for). Sequence-sharded strategies: (local_index, 1.0);
        head-sharded ones (Ulysses) override it. Used to measure compute balance."""
        return ctx.local_index, 1.0

    def forward_bytes(self, shape: LayerShape) -> int:
        """Bytes one rank receives in one layer's forward, by the strategy's formula."""
        raise NotImplementedError


class SoftmaxStrategy(Strategy):
    """Softmax attention: q [B, C, H, D], k, v [B, C, Hkv, D] (local shards) -> o [B, C, H, D],
    exact in forward and backward against single-device attention on the unsharded row."""

    kind = "softmax"

    def __call__(self, q, k, v, ctx, *, causal=True, window=None, scale=None):
        return self.attention(q, k, v, ctx, causal=causal, window=window, scale=scale)

    def attention(self, q, k, v, ctx, *, causal=True, window=None, scale=None):
        raise NotImplementedError


class LinearStrategy(Strategy):
    """Linear attention: q, k [B, C, H, Dk], v [B, C, H, Dv], g [B, C, H], gk [B, C, H, Dk]
    (local shards) -> o [B, C, H, Dv], exact against the single-device op on the whole row."""

    kind = "linear"

    def __call__(self, q, k, v, ctx, *, g=None, gk=None, scale=1.0, chunk_size=64, impl="auto"):
        return self.linear_attention(q, k, v, ctx, g=g, gk=gk, scale=scale, chunk_size=chunk_size, impl=impl)

    def linear_attention(self, q, k, v, ctx, *, g=None, gk=None, scale=1.0, chunk_size=64, impl="auto"):
        raise NotImplementedError


def strategy_names(kind: str) -> list[str]:
    """Registered strategies serving mixer kind ``kind`` (plus ``local``), sorted."""
    return sorted(n for n, cls in STRATEGIES.items() if cls.kind in (kind, None))


def build_strategy(name: str, kind: str | None = None, **options) -> Strategy:
    """The strategy ``name`` built with its options. ``kind``: the mixer kind it must serve
    (``parallel.cp.strategies.<kind>``), checked, for error messages naming the setting."""
    setting = f"parallel.cp.strategies.{kind}" if kind else "strategy"
    cls = STRATEGIES.get(name)
    if cls is None or (kind is not None and cls.kind not in (kind, None)):
        choices = strategy_names(kind) if kind else sorted(STRATEGIES)
        what = "is unknown" if cls is None else f"serves {cls.kind} layers, not {kind} ones"
        raise ValueError(f"{setting}={name!r} {what}: choose one of {choices}")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
    unknown = set(options) - accepted
    if unknown:
        raise ValueError(
            f"parallel.cp.options.{kind or '<kind>'} has {sorted(unknown)}, which "
            f"strategy {name!r} does not take: its options are "
            f"{sorted(accepted) or 'none'}"
        )
    return cls(**options)


def build_strategies(names: dict, options: dict, kinds) -> dict:
    """{kind: strategy} for the mixer ``kinds`` a model uses: ``names[kind]`` (or the kind's
    default) built with ``options.get(kind, {})``. Raises ValueError naming the setting."""
    out = {}
    for kind in kinds:
        name = names.get(kind) or DEFAULTS.get(kind)
        if name is None:
            raise ValueError(
                f"mixer kind {kind!r} has no context-parallel strategy: set "
                f"parallel.cp.strategies.{kind} (registered: {sorted(STRATEGIES)})"
            )
        out[kind] = build_strategy(name, kind, **dict(options.get(kind) or {}))
    return out
