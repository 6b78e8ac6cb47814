"""Inference memory of a model's token mixers: the KV cache per token and the fixed-size state.

    kv_cache_bytes(cfg, elem_bytes=2) -> {"kv_cache_bytes_per_token": ..., "state_bytes": ...}

Per layer, by kind: ``softmax`` and ``sparse`` (S2 caches every key: its pattern chooses which
to read, not which to keep) 2 * n_kv_heads * head_dim numbers per token; ``mla`` the latent and
the shared RoPE key, kv_lora_rank + qk_rope_head_dim; ``linear`` nothing per token and a state of
n_heads * Dk * Dv (Dk: the feature map's width) per sequence; ``landmark`` like softmax (its
landmark tokens are tokens of the sequence). A mixer with a ``cache_bytes(cfg, layer,
elem_bytes) -> (per token, state)`` of its own (the window + linear layers, liger / lolcats /
lizard: a bounded window of keys and values plus the linear state) is counted by it. Sliding
windows of softmax layers are not counted (a cache may drop keys beyond the window; the numbers
are for the full context).
"""

from __future__ import annotations

import torch

from models.registry import mixer_class, options_of


def kv_cache_bytes(cfg, elem_bytes: int = 2) -> dict[str, int]:
    per_token = state = 0
    for i in range(cfg.n_layers):
        kind, cls = cfg.kind_of(i), mixer_class(cfg.mixer_of(i))
        if hasattr(cls, "cache_bytes"):
            t, st = cls.cache_bytes(cfg, i, elem_bytes)
            per_token, state = per_token + t, state + st
        elif kind == "mla":
            dc, _, dr, _ = options_of(cfg, "mla").dims(cfg)
            per_token += (dc + dr) * elem_bytes
        elif kind in ("softmax", "sparse", "landmark"):
            per_token += 2 * cfg.n_kv_heads * cfg.hd * elem_bytes
        elif kind == "linear":
            with torch.device("meta"):  # the layer's feature width, without allocating weights
                dk = cls(cfg, i).dk
            state += cfg.n_heads * dk * cfg.hd * elem_bytes
    return {"kv_cache_bytes_per_token": per_token, "state_bytes": state}
