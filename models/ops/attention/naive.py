"""Naive dense reference for softmax attention: materialises the full [B, H, Tq, Tk] mask (from
the slices, token by token: ``MaskSpec.allowed``) and runs through autograd. The tests compare
every kernel path and every CP strategy to it.

Shapes: q [B, Tq, H, D], k, v [B, Tk, Hkv, D] -> (o [B, Tq, H, D], lse [B, H, Tq]).
"""

from __future__ import annotations

import math

import torch

from models.ops.attention.plan import MaskSpec


def attention_ref(q, k, v, mask: MaskSpec, scale: float | None = None):
    """Naive dense reference: materialises the full [B, H, Tq, Tk] mask. Autograd only."""
    bsz, tq, h, d = q.shape
    groups = h // k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kk = k.repeat_interleave(groups, dim=2)
    vv = v.repeat_interleave(groups, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    kidx = torch.arange(k.shape[1])
    allowed = torch.stack([mask.allowed(slice(None), kidx, b, h) for b in range(bsz)])
    if allowed.dim() == 3:  # the same for every head
        allowed = allowed[:, None]  # [B, 1 or H, Tq, Tk]
    if mask.pattern is not None:  # per query head: the pattern of its kv head
        heads = [
            torch.stack([mask.pattern_allowed(slice(None), kidx, mask.global_head(hq // groups), b) for hq in range(h)])
            for b in range(bsz)
        ]
        allowed = allowed & torch.stack(heads)  # [B, H, Tq, Tk]
    s = s.masked_fill(~allowed.to(s.device), -math.inf)  # the mask is built from CPU positions
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", p, vv), lse
