"""Rotary position embeddings with the scalings used for context extension.

Positions come in with the batch (``positions [B, T]``, restarting at every document),
so RoPE is unaffected by how context parallelism permutes tokens.
Frequencies follow the Hugging Face definitions, so imported checkpoints match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROPE_TYPES = ("none", "linear", "ntk", "yarn", "llama3")


@dataclass
class RopeConfig:
    """RoPE and its scaling for context extension.

    type: none | linear (position interpolation) | ntk (base-theta change by ``factor``)
          | yarn | llama3
    """

    theta: float = 10000.0
    type: str = "none"
    factor: float = 1.0
    original_max_position: int = 2048
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn: None -> 0.1 * ln(factor) + 1


def inv_frequencies(cfg: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [head_dim // 2] fp32, attention scaling of cos/sin)."""
    base = cfg.theta
    if cfg.type == "ntk":  # NTK-aware: change the base so the lowest frequency stretches by factor
        base = base * cfg.factor ** (head_dim / (head_dim - 2))
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if cfg.type == "linear":
        return inv / cfg.factor, 1.0
    if cfg.type == "llama3":
        return _llama3(inv, cfg), 1.0
    if cfg.type == "yarn":
        return _yarn(cfg, head_dim)
    return inv, 1.0


def _llama3(inv: torch.Tensor, cfg: RopeConfig) -> torch.Tensor:
    old = cfg.original_max_position
    low_wavelen, high_wavelen = old / cfg.low_freq_factor, old / cfg.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / cfg.factor, inv)
    smooth = (old / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(cfg: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    base, factor = cfg.theta, cfg.factor
    attn = cfg.attention_factor
    if attn is None:
        attn = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0

    def corr_dim(rot):
        return (dim * math.log(cfg.original_max_position / (rot * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(corr_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(corr_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extra_factor = 1 - ramp
    return inter * (1 - extra_factor) + extra * extra_factor, attn


class Rotary(torch.nn.Module):
    def __init__(self, cfg: RopeConfig, head_dim: int):
        super().__init__()
        inv, self.attention_scaling = inv_frequencies(cfg, head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions [B, T] -> cos, sin [B, T, 1, head_dim] (computed in fp32, like HF)."""
        freqs = positions[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos[:, :, None, :], sin[:, :, None, :]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads_first: bool = False) -> torch.Tensor:
    """x [B, T, H, D] rotated by cos/sin [B, T, 1, D]; the result keeps x's dtype.

    dtype: under bf16 autocast the projections give bf16 q, k while cos/sin follow the fp32
    residual stream: the rotation is computed in fp32 (as Hugging Face does) and rounded back,
    so the attention op gets bf16 q, k, v (flash-attn applies; saved activations stay half
    size) instead of fp32 q, k next to a bf16 v.
    heads_first: lay the result out heads-first in memory ([B, H, T, D] contiguous, seen as
    [B, T, H, D]), at no cost: the rotate-half term (a fresh heads-first tensor) comes first
    in the sum, whose output takes its layout. Otherwise token-major, like x."""
    if not heads_first:
        return (x * cos + _rotate_half(x) * sin).to(x.dtype)
    xt = x.transpose(1, 2)
    out = _rotate_half(xt) * sin.transpose(1, 2) + xt * cos.transpose(1, 2)
    return out.to(x.dtype).transpose(1, 2)
