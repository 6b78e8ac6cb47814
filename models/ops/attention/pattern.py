"""The pattern path of softmax attention: masks with a per-KV-head block pattern (S2,
models/s2_pattern.py), in plain PyTorch.

Shapes: q [B, Tq, H, D], k, v [B, Tk, Hkv, D], o [B, Tq, H, D], lse [B, H, Tq] fp32/fp64.

``MaskSpec.pattern`` adds, per KV head, ``pattern.active(i // b, j // b, hk)`` at block size
b = ``pattern.block`` (``hk`` the *global* KV head: ``MaskSpec.kv_heads`` maps local KV heads to
global ones when a strategy holds a slice of the heads, e.g. Ulysses). The kernel works per
group of KV heads with the same layout and, with query tiles of ``pattern.block`` tokens,
gathers for each tile only the key tiles the pattern and the mask leave non-empty
(``tile_plan``): its work is proportional to the active blocks; inactive blocks are never
computed.
"""

from __future__ import annotations

import math

import torch

from models.ops.attention.plan import DEFAULT_BLOCK, MaskSpec, tile_plan
from models.ops.common import acc_dtype


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[tk, Hkv, D] -> [H, tk, D] with each kv head repeated ``groups`` times."""
    return x.repeat_interleave(groups, dim=1).transpose(0, 1) if groups > 1 else x.transpose(0, 1)


def _fold_kv_grad(g: torch.Tensor, groups: int) -> torch.Tensor:
    """[H, tk, D] -> [tk, Hkv, D], summing the query heads that share a kv head."""
    h, tk, d = g.shape
    return g.reshape(h // groups, groups, tk, d).sum(1).transpose(0, 1)


def _tile_mask(mask: MaskSpec, qs: slice, kidx: torch.Tensor, b: int, head: int | None) -> torch.Tensor:
    """bool [tq, tk]: the token mask of one tile, with the group's block pattern if any."""
    allowed = mask.allowed(qs, kidx, b)
    return allowed if head is None else allowed & mask.pattern_allowed(qs, kidx, head, b)


def pattern_forward(
    q, k, v, mask: MaskSpec, scale: float | None = None, block: int = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_forward`` for a mask with a per-head block pattern: per group of KV heads with
    one layout, tiles of ``pattern.block`` queries against only their active key tiles."""
    bsz, tq, h, d = q.shape
    groups = h // k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = acc_dtype(q)
    o = torch.zeros(bsz, tq, h, d, dtype=acc, device=q.device)
    lse = torch.full((bsz, h, tq), -math.inf, dtype=acc, device=q.device)
    runs, tile, plan = tile_plan(mask, block, k.shape[2])
    for b in range(bsz):
        for (hs, head), tiles in zip(runs, plan[b]):
            qh = slice(hs.start * groups, hs.stop * groups)  # the query heads of these kv heads
            for iq, (kidx, masked) in enumerate(tiles):
                if kidx.numel() == 0:
                    continue
                qs = slice(iq * tile, min(tq, (iq + 1) * tile))
                allowed = _tile_mask(mask, qs, kidx, b, head if masked else None)  # [tq, tk]
                qb = q[b, qs, qh].transpose(0, 1).to(acc)  # [h, tq, D]
                kb = _expand_kv(k[b, kidx, hs].to(acc), groups)  # [h, tk, D]
                vb = _expand_kv(v[b, kidx, hs].to(acc), groups)
                s = torch.matmul(qb, kb.transpose(1, 2)) * scale  # [h, tq, tk]
                s = s.masked_fill(~allowed, -math.inf)
                m = torch.logsumexp(s, dim=-1)  # [h, tq]
                p = torch.exp(s - torch.where(torch.isinf(m), 0.0, m)[..., None])
                o[b, qs, qh] = torch.matmul(p, vb).transpose(0, 1)
                lse[b, qh, qs] = m
    return o.to(q.dtype), lse


def pattern_backward(do, q, k, v, o, lse, mask: MaskSpec, scale: float | None = None, block: int = DEFAULT_BLOCK):
    """Gradients (dq, dk, dv) of ``o`` for one (Q, K) block pair, recomputed from ``lse``.

    ``o`` and ``lse`` may be the merged output / lse over several key chunks (ring
    attention): then the returned gradients are this key chunk's exact share.
    """
    bsz, tq, h, d = q.shape
    groups = h // k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = acc_dtype(q)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    delta = (do.to(acc) * o.to(acc)).sum(-1).transpose(1, 2)  # [B, H, Tq]
    runs, tile, plan = tile_plan(mask, block, k.shape[2])
    for b in range(bsz):
        for (hs, head), tiles in zip(runs, plan[b]):
            qh = slice(hs.start * groups, hs.stop * groups)
            for iq, (kidx, masked) in enumerate(tiles):
                if kidx.numel() == 0:
                    continue
                qs = slice(iq * tile, min(tq, (iq + 1) * tile))
                allowed = _tile_mask(mask, qs, kidx, b, head if masked else None)
                qb = q[b, qs, qh].transpose(0, 1).to(acc)  # [h, tq, D]
                kb = _expand_kv(k[b, kidx, hs].to(acc), groups)  # [h, tk, D]
                vb = _expand_kv(v[b, kidx, hs].to(acc), groups)
                dob = do[b, qs, qh].transpose(0, 1).to(acc)  # [h, tq, D]
                m = lse[b, qh, qs]
                s = torch.matmul(qb, kb.transpose(1, 2)) * scale
                p = torch.exp(s - torch.where(torch.isinf(m), 0.0, m)[..., None])
                p = p.masked_fill(~allowed, 0.0)
                dp = torch.matmul(dob, vb.transpose(1, 2))  # [h, tq, tk]
                ds = p * (dp - delta[b, qh, qs][..., None])
                dq[b, qs, qh] += torch.matmul(ds, kb).transpose(0, 1) * scale
                dk[b, :, hs].index_add_(0, kidx, _fold_kv_grad(torch.matmul(ds.transpose(1, 2), qb) * scale, groups))
                dv[b, :, hs].index_add_(0, kidx, _fold_kv_grad(torch.matmul(p.transpose(1, 2), dob), groups))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
