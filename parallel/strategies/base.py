"""The interface every context-parallel strategy implements, one base per mixer kind.

A strategy serves one or more mixer kinds (``kinds``: ``softmax``, ``linear``, ...) across
the ranks of a CP group; ``CPContext.run(kind, ...)`` calls ``strategy(q, k, v, ctx,
**options)`` with the local shards and the kind's options (models/context.py lists them). A CP
world of one never reaches a strategy: the context runs the kind's single-device op
(models/registry.py).

Registering: ``@register("name")`` on a subclass of the kind's base (``SoftmaxStrategy``,
``LinearStrategy``); ``default="softmax"`` makes it that kind's default when
``parallel.cp.strategies`` does not name one. A strategy that also serves another kind (e.g. a
softmax strategy that accepts a sparse pattern) lists it in ``kinds``. Its settings
(``parallel.cp.options.<kind>.<key>``) are the fields of its ``Options`` dataclass, defaults
there once: ``build_strategy`` rejects unknown keys and wrong types from it, ``Options.validate``
checks values, and the constructor sets each field as an attribute. Every strategy states
the bytes one rank receives in one layer's forward by its formula,
``forward_bytes(LayerShape)``, which the tests and benchmarks check against the bytes
``parallel.comm`` counts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass

from models.ops.attention import check_inputs, check_mask
from models.s2_pattern import check_sparse_options
from parallel.sharding import check_divisible

STRATEGIES: dict[str, type] = {}  # name -> class (its ``kinds`` say what it serves)
DEFAULTS: dict[str, str] = {}  # mixer kind -> default strategy name


def register(name: str, default: str | None = None):
    """Register a strategy class under ``name``; ``default``: the mixer kind it is the
    default strategy of (one of ``cls.kinds``)."""

    def wrap(cls):
        cls.name = name
        STRATEGIES[name] = cls
        if default is not None:
            if default not in cls.kinds:
                raise TypeError(f"strategy {name!r} is the default of {default!r} but serves {cls.kinds}")
            DEFAULTS[default] = name
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
    pattern: object | None = None  # the layer's block pattern (sparse kind), for S2 byte formulas
    latent_dim: int | None = None  # MLA: Dc + Dr numbers per token (the latent and the RoPE key)


@dataclass
class NoOptions:
    """The options of a strategy that takes none; a strategy's own ``Options`` dataclass lists its
    fields with their defaults and may check values in ``validate(where)``."""

    def validate(self, where: str) -> None:
        """Raise ValueError naming ``{where}.<field>`` for a bad value (types are checked already)."""


_TYPE_WORDS = {bool: "true or false", int: "an int", float: "a number", str: "a string"}


def _type_ok(value, hint) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typing.get_origin(hint) or hint)


def _type_words(hint) -> str:
    args = [h for h in typing.get_args(hint) if h is not type(None)] or [hint]
    words = " or ".join(_TYPE_WORDS.get(h, getattr(h, "__name__", str(h))) for h in args)
    return words + (" or null" if type(None) in typing.get_args(hint) else "")


class Strategy:
    """Base of all strategies. Subclasses set ``kinds`` (via their kind's base; an empty tuple
    means any kind on one rank), ``Options`` (a dataclass, when they take any) and implement
    ``__call__`` and ``forward_bytes``."""

    name = "base"
    kinds: tuple[str, ...] = ()
    layouts = ("contiguous", "zigzag")
    Options: type = NoOptions

    def __init__(self, **options):
        opts = self.check_options(options, self.kind)
        for f in dataclasses.fields(opts):
            setattr(self, f.name, getattr(opts, f.name))

    @classmethod
    def check_options(cls, options: dict, kind: str | None):
        """``cls.Options`` built from ``options``; ValueError naming parallel.cp.options.<kind>.<key>
        for an unknown key, a wrong type or a bad value."""
        where = f"parallel.cp.options.{kind or '<kind>'}"
        hints = typing.get_type_hints(cls.Options)
        unknown = set(options) - set(hints)
        if unknown:
            raise ValueError(
                f"{where} has {sorted(unknown)}, which strategy {cls.name!r} does not take: "
                f"its options are {sorted(hints) or 'none'}"
            )
        for key, value in options.items():
            if not _type_ok(value, hints[key]):
                raise ValueError(f"{where}.{key}={value!r} must be {_type_words(hints[key])}")
        opts = cls.Options(**options)
        opts.validate(where)
        return opts

    @property
    def kind(self) -> str | None:
        """The primary kind served (the first of ``kinds``)."""
        return self.kinds[0] if self.kinds else None

    def serves(self) -> dict:
        """{kind: self}: what a context built from this strategy alone routes to it."""
        return {kind: self for kind in self.kinds}

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

    def work_queries(self, ctx, n_heads: int, n_kv_heads: int, *, causal=True, window=None):
        """(global row positions of the queries this rank computes attention for, fraction of
        the heads it computes them for). Sequence-sharded strategies: (local_index, 1.0);
        head-sharded ones (Ulysses) override it; strategies whose placement depends on the
        layer (CAD) read its heads and mask from the arguments. Used to measure compute balance."""
        return ctx.local_index, 1.0

    def forward_bytes(self, shape: LayerShape) -> int:
        """Bytes one rank receives in one layer's forward, by the strategy's formula."""
        raise NotImplementedError


class SoftmaxStrategy(Strategy):
    """Softmax attention: q [B, C, H, D], k, v [B, C, Hkv, D] (local shards) -> o [B, C, H, D],
    exact in forward and backward against single-device attention on the unsharded row.

    A softmax strategy that also lists ``sparse`` in its ``kinds`` serves S2 layers: its
    ``attention`` then takes ``pattern`` (a per-KV-head block pattern, models/s2_pattern.py)
    and puts it into its masks (``MaskSpec.pattern``, with the global KV heads it holds).
    ``mask``: a ``SliceMask`` over the global row (any mask family, slices.py) that replaces the
    packed-documents mask; every softmax strategy takes it."""

    kinds = ("softmax",)

    def __call__(self, q, k, v, ctx, *, causal=True, window=None, scale=None, pattern=None, mask=None):
        check_inputs(q, k, window)
        if mask is not None:  # a SliceMask (models/ops/attention/slices.py) instead of documents
            mask = ctx.slice_mask(mask, q.shape[2])
            check_mask(mask, q, ctx.batch_size, ctx.seq_len, causal, window)
            return self.attention(q, k, v, ctx, causal=causal, window=window, scale=scale, mask=mask)
        if pattern is None:
            return self.attention(q, k, v, ctx, causal=causal, window=window, scale=scale)
        check_sparse_options(pattern, causal)
        return self.attention(q, k, v, ctx, causal=causal, window=window, scale=scale, pattern=pattern)

    def attention(self, q, k, v, ctx, *, causal=True, window=None, scale=None):
        raise NotImplementedError


@dataclass
class LASPOptions(NoOptions):
    """The options of the LASP strategies (lasp1, lasp2)."""

    recompute: bool = True  # keep only the layer inputs for backward, recompute the state terms


class LinearStrategy(Strategy):
    """Linear attention: q, k [B, C, H, Dk], v [B, C, H, Dv], g [B, C, H], gk [B, C, H, Dk]
    (local shards) -> o [B, C, H, Dv], exact against the single-device op on the whole row."""

    kinds = ("linear",)

    def __call__(self, q, k, v, ctx, *, g=None, gk=None, scale=1.0, chunk_size=64, impl="auto"):
        return self.linear_attention(q, k, v, ctx, g=g, gk=gk, scale=scale, chunk_size=chunk_size, impl=impl)

    def linear_attention(self, q, k, v, ctx, *, g=None, gk=None, scale=1.0, chunk_size=64, impl="auto"):
        raise NotImplementedError


def strategy_names(kind: str) -> list[str]:
    """Registered strategies serving mixer kind ``kind`` (plus ``local``), sorted."""
    return sorted(n for n, cls in STRATEGIES.items() if kind in cls.kinds or not cls.kinds)


def build_strategy(name: str, kind: str | None = None, **options) -> Strategy:
    """The strategy ``name`` built with its options. ``kind``: the mixer kind it must serve
    (``parallel.cp.strategies.<kind>``), checked, for error messages naming the setting."""
    setting = f"parallel.cp.strategies.{kind}" if kind else "strategy"
    cls = STRATEGIES.get(name)
    if cls is None or (kind is not None and cls.kinds and kind not in cls.kinds):
        choices = strategy_names(kind) if kind else sorted(STRATEGIES)
        served = " and ".join(cls.kinds) if cls is not None else ""
        what = "is unknown" if cls is None else f"serves {served} layers, not {kind} ones"
        raise ValueError(f"{setting}={name!r} {what}: choose one of {choices}")
    cls.check_options(options, kind or (cls.kinds[0] if cls.kinds else None))  # errors name the kind
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
