"""Token mixers by name: a layer's mixer is chosen from ``model.mixer_pattern``.

Every mixer has the signature ``forward(x [B, T, dim], cos, sin, ctx) -> [B, T, dim]``,
declares its ``kind`` and reaches its cross-token computation only through the attention
context: ``ctx.run(self.kind, q, k, v, **options)``. Importing this module registers every
mixer (the single-device op of every kind, and the options of every mixer module) in
``models.registry``; a new mixer module is one import line here.
"""

from __future__ import annotations

from models import (  # noqa: F401  (registration)
    hybrid_attention,
    landmark_attention,
    linear_attention,
    lizard_attention,
    mla_attention,
    s2_attention,
    softmax_attention,
)
from models.registry import KINDS, MIXERS, mixer_class


def build_mixer(name: str, cfg, layer: int):
    return mixer_class(name)(cfg, layer)


__all__ = ["KINDS", "MIXERS", "build_mixer", "mixer_class"]
