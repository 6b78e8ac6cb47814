"""Token mixers by name: a layer's mixer is chosen from ``model.mixer_pattern``.

Every mixer has the signature ``forward(x [B, T, dim], cos, sin, ctx) -> [B, T, dim]``,
declares its ``kind`` and reaches its cross-token computation only through the attention
context: ``ctx.run(self.kind, q, k, v, **options)``. Importing this module registers every
mixer (and the single-device op of every kind) in ``models.registry``.
"""

from __future__ import annotations

from models import linear_attention, s2_attention, softmax_attention  # noqa: F401  (registration)
from models.registry import KINDS, MIXERS


def mixer_class(name: str) -> type:
    if name not in MIXERS:
        raise ValueError(f"model.mixer_pattern has unknown mixer {name!r}: choose from {sorted(MIXERS)}")
    return MIXERS[name]


def build_mixer(name: str, cfg, layer: int):
    return mixer_class(name)(cfg, layer)


__all__ = ["KINDS", "MIXERS", "build_mixer", "mixer_class"]
