"""Softmax attention mixer: GQA, RoPE, optional sliding window.

x [B, T, dim] -> q [B, T, H, D], k, v [B, T, Hkv, D] -> ctx.attention -> [B, T, dim].
"""
from __future__ import annotations

from torch import nn

from models.mixers import register_mixer
from models.rope import apply_rotary


@register_mixer("softmax")
class SoftmaxAttention(nn.Module):
    def __init__(self, cfg, layer: int):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.hd
        self.window = cfg.sliding_window
        self.q_proj = nn.Linear(cfg.dim, self.n_heads * self.hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.dim, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.dim, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin, ctx):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.hd)
        k = self.k_proj(x).view(b, t, self.n_kv, self.hd)
        v = self.v_proj(x).view(b, t, self.n_kv, self.hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = ctx.attention(q, k, v, causal=True, window=self.window)
        return self.o_proj(o.reshape(b, t, self.n_heads * self.hd))
