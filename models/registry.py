"""Registries of token mixers, mixer kinds and mixer options (imports nothing else from ``models``
at load time).

A *mixer* is a layer's token-mixing module, chosen by name in ``model.mixer_pattern``. Each
mixer declares its *kind*, the name of the core operation it hands to the attention context
(``ctx.run(kind, q, k, v, **options)``): ``softmax``, ``linear``, ... Every kind registers
its single-device op here; under context parallelism a strategy per kind (``parallel/``)
replaces it, and a CP world of one falls back to this op. A mixer module with settings
registers their *options*: a dataclass whose field ``f`` is the user key ``model.<prefix>_f``
(a flat ``ModelConfig`` field, None there meaning the dataclass default), and whose
``validate(cfg)`` checks them.

    @register_kind("linear", reference=local_linear_ref)
    def local_linear(q, k, v, ctx, **options): ...      # ctx.docs: models.ops.documents.Documents

    @register_mixer("gla")
    class GatedLinearAttention(nn.Module):
        kind = "linear"

    @register_mixer("liger")                             # a layer that calls two kinds
    class LigerAttention(nn.Module):
        kinds = ("linear", "softmax")                    # kind: the first, the layer's primary

    @register_options("linear")                          # model.linear_chunk_size, ...
    @dataclass
    class LinearOptions:
        chunk_size: int = 64
        def validate(self, cfg): ...

The lookups below first import ``models.mixers`` (which imports every mixer module), so a
caller -- ``models.config`` included, which sits above the mixers and never imports them --
always sees every registered mixer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

MIXERS: dict[str, type] = {}  # mixer name -> module class (with ``kind`` and ``kinds`` attributes)
KINDS: dict[str, Callable] = {}  # mixer kind -> single-device op
REFERENCES: dict[str, Callable] = {}  # mixer kind -> its naive reference op (same signature)
OPTIONS: dict[str, type] = {}  # key prefix (model.<prefix>_*) -> options dataclass


def register_mixer(name: str):
    """Register a mixer class. It declares the kind it calls (``kind = "softmax"``) or, when one
    layer calls several, all of them (``kinds = ("linear", "softmax")``: one strategy per kind
    under CP, one CP group and one layout). Afterwards ``cls.kinds`` lists every kind it calls and
    ``cls.kind`` is the first (the primary kind, which per-layer cost estimates read)."""

    def wrap(cls):
        # the nearest class of the hierarchy that declares ``kinds`` or ``kind`` decides
        decl = next((c.__dict__ for c in cls.__mro__ if "kinds" in c.__dict__ or "kind" in c.__dict__), {})
        kinds = decl.get("kinds") if "kinds" in decl else (decl.get("kind"),)
        if not (isinstance(kinds, tuple) and kinds and all(isinstance(k, str) for k in kinds)):
            raise TypeError(
                f"mixer {name!r} ({cls.__name__}) must declare its kind, e.g. kind = 'softmax', or the "
                "kinds one layer calls, e.g. kinds = ('linear', 'softmax')"
            )
        cls.kind, cls.kinds = kinds[0], kinds
        MIXERS[name] = cls
        return cls

    return wrap


def register_kind(kind: str, *, reference: Callable):
    """Register the single-device op of mixer kind ``kind`` and, beside it, its naive reference
    (same signature and result; slow and plain): the tests hold every kind's op, and through it
    every mixer of the kind, to its reference."""

    def wrap(fn):
        KINDS[kind] = fn
        REFERENCES[kind] = reference
        return fn

    return wrap


def register_options(prefix: str):
    """Register an options dataclass whose fields are the settings ``model.<prefix>_<field>``."""

    def wrap(cls):
        if not dataclasses.is_dataclass(cls) or not callable(getattr(cls, "validate", None)):
            raise TypeError(f"options {prefix!r} ({cls.__name__}) must be a dataclass with validate(cfg)")
        OPTIONS[prefix] = cls
        return cls

    return wrap


def _load() -> None:
    """Import every mixer module once (they register themselves); a no-op afterwards."""
    import models.mixers  # noqa: F401


def mixer_class(name: str) -> type:
    """The module class of mixer ``name``; ValueError naming model.mixer_pattern if unknown."""
    _load()
    if name not in MIXERS:
        raise ValueError(f"model.mixer_pattern has unknown mixer {name!r}: choose from {sorted(MIXERS)}")
    return MIXERS[name]


def mixer_kinds() -> list[str]:
    """Every registered mixer kind, sorted."""
    _load()
    return sorted(KINDS)


def local_op(kind: str) -> Callable:
    """The single-device op of mixer kind ``kind``."""
    _load()
    if kind not in KINDS:
        raise ValueError(f"mixer kind {kind!r} has no registered op: choose one of {sorted(KINDS)}")
    return KINDS[kind]


def reference_op(kind: str) -> Callable:
    """The naive reference of mixer kind ``kind``'s single-device op."""
    local_op(kind)  # the same error for an unknown kind
    return REFERENCES[kind]


def options_of(cfg, prefix: str):
    """The options ``prefix`` of model config ``cfg``: each field from ``cfg.<prefix>_<field>``,
    the dataclass default where that is None (or absent)."""
    _load()
    cls = OPTIONS[prefix]
    given = {f.name: getattr(cfg, f"{prefix}_{f.name}", None) for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in given.items() if v is not None})


def validate_options(cfg) -> None:
    """Every registered options dataclass checks its settings of ``cfg`` (ValueError naming one)."""
    _load()
    for prefix in OPTIONS:
        options_of(cfg, prefix).validate(cfg)
