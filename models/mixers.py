"""Registry of token mixers: a layer's mixer is chosen by name from ``model.mixer_pattern``.

Every mixer has the signature ``forward(x [B, T, dim], cos, sin, ctx) -> [B, T, dim]`` and
reaches any cross-token computation through the attention context ``ctx``.
"""
from __future__ import annotations

MIXER_REGISTRY: dict[str, type] = {}


def register_mixer(name: str):
    def wrap(cls):
        MIXER_REGISTRY[name] = cls
        return cls
    return wrap


def build_mixer(name: str, cfg, layer: int):
    return MIXER_REGISTRY[name](cfg, layer)


from models import softmax_attention  # noqa: E402,F401  (registers "softmax")
from models import linear_attention  # noqa: E402,F401  (registers the linear-attention mixers)
