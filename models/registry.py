"""Registries of token mixers and mixer kinds (imports nothing else from ``models``).

A *mixer* is a layer's token-mixing module, chosen by name in ``model.mixer_pattern``. Each
mixer declares its *kind*, the name of the core operation it hands to the attention context
(``ctx.run(kind, q, k, v, **options)``): ``softmax``, ``linear``, ... Every kind registers
its single-device op here; under context parallelism a strategy per kind (``parallel/``)
replaces it, and a CP world of one falls back to this op.

    @register_kind("linear")
    def local_linear(q, k, v, ctx, **options): ...      # ctx.docs: models.ops.documents.Documents

    @register_mixer("gla")
    class GatedLinearAttention(nn.Module):
        kind = "linear"
"""

from __future__ import annotations

from collections.abc import Callable

MIXERS: dict[str, type] = {}  # mixer name -> module class (with a ``kind`` attribute)
KINDS: dict[str, Callable] = {}  # mixer kind -> single-device op


def register_mixer(name: str):
    def wrap(cls):
        if not isinstance(getattr(cls, "kind", None), str):
            raise TypeError(f"mixer {name!r} ({cls.__name__}) must declare its kind, e.g. kind = 'softmax'")
        MIXERS[name] = cls
        return cls

    return wrap


def register_kind(kind: str):
    def wrap(fn):
        KINDS[kind] = fn
        return fn

    return wrap


def local_op(kind: str) -> Callable:
    """The single-device op of mixer kind ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"mixer kind {kind!r} has no registered op: choose one of {sorted(KINDS)}")
    return KINDS[kind]
