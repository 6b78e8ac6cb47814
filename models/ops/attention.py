"""Block-sparse softmax attention that returns the log-sum-exp, in plain PyTorch.

Shapes (one layout everywhere):
    q        [B, Tq, H, D]       queries
    k, v     [B, Tk, Hkv, D]     keys / values, H % Hkv == 0 (GQA)
    q_pos    [Tq]  int64         index of each query in its (global, unsharded) row
    k_pos    [Tk]  int64         index of each key in its row
    q_doc    [B, Tq] int64       document id of each query (packed sequences)
    k_doc    [B, Tk] int64       document id of each key
    o        [B, Tq, H, D]
    lse      [B, H, Tq]  fp32/fp64, -inf where a query row sees no key

A query at position i may see a key at position j iff they share a document, and
``j <= i`` when causal, and ``i - j < window`` (``|i - j| < window`` when not causal)
when a sliding window is set. Because positions are explicit, a Q chunk can meet a K
chunk from anywhere in the sequence (ring steps, zigzag halves, all-gathered K/V).

Blocks of (query, key) pairs that the mask leaves empty are skipped: for every query
block, only key blocks that can hold an allowed pair are gathered and computed. Rows
that see no key produce zeros (and lse = -inf), never NaN.

Backward recomputes probabilities from the saved lse (flash-attention style), so a CP
strategy can call :func:`attention_backward` with the *merged* output and lse of several
blocks and get exact per-block gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_BLOCK = 256


@dataclass(frozen=True)
class MaskSpec:
    """Index metadata for one (Q chunk, K chunk) pair; see the module docstring."""

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    q_doc: torch.Tensor
    k_doc: torch.Tensor
    causal: bool = True
    window: int | None = None

    def allowed(self, qs: slice, kidx: torch.Tensor, b: int) -> torch.Tensor:
        """Boolean mask [tq, tk] for queries ``qs`` and key indices ``kidx`` of row b."""
        qp = self.q_pos[qs][:, None]
        kp = self.k_pos[kidx][None, :]
        m = self.q_doc[b, qs][:, None] == self.k_doc[b, kidx][None, :]
        if self.causal:
            m = m & (kp <= qp)
        if self.window is not None:
            diff = qp - kp if self.causal else (qp - kp).abs()
            m = m & (diff < self.window)
        return m


def check_inputs(q: torch.Tensor, k: torch.Tensor, window: int | None) -> None:
    """Cheap checks at the boundary of softmax attention (once per call, before any
    collective): GQA head counts and the sliding window."""
    if window is not None and window < 1:
        raise ValueError(f"attention window={window} must be >= 1 or None (model.sliding_window)")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"q has {q.shape[2]} heads, not a multiple of the {k.shape[2]} k/v heads: "
            "model.n_heads must be divisible by model.n_kv_heads"
        )


def _block_bounds(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block min and max of a 1-D (or [B, T]) tensor along its last dim."""
    t = x.shape[-1]
    nb = (t + block - 1) // block
    pad = nb * block - t
    # pad with the row's own last value (padding with int extremes overflows in F.pad)
    edge = x[..., -1:].expand(*x.shape[:-1], pad)
    lo = hi = torch.cat([x, edge], dim=-1)
    lo = lo.reshape(*x.shape[:-1], nb, block).amin(-1)
    hi = hi.reshape(*x.shape[:-1], nb, block).amax(-1)
    return lo, hi


def block_candidates(mask: MaskSpec, block_q: int, block_k: int) -> torch.Tensor:
    """[B, nq, nk] bool: may query block i and key block j of row b hold an allowed pair?
    A conservative test on per-block position and document bounds (never a false 'no')."""
    qlo, qhi = _block_bounds(mask.q_pos, block_q)  # [nq]
    klo, khi = _block_bounds(mask.k_pos, block_k)  # [nk]
    qdlo, qdhi = _block_bounds(mask.q_doc, block_q)  # [B, nq]
    kdlo, kdhi = _block_bounds(mask.k_doc, block_k)  # [B, nk]
    ok = torch.ones(qlo.shape[0], klo.shape[0], dtype=torch.bool)
    if mask.causal:
        ok &= klo[None, :] <= qhi[:, None]
    if mask.window is not None:
        ok &= (qlo[:, None] - khi[None, :]) < mask.window
        if not mask.causal:
            ok &= (klo[None, :] - qhi[:, None]) < mask.window
    docs = (kdlo[:, None, :] <= qdhi[:, :, None]) & (kdhi[:, None, :] >= qdlo[:, :, None])
    return ok[None] & docs


def may_attend(mask: MaskSpec, block: int) -> bool:
    """False only if no (query, key) pair of the whole (Q, K) pair is allowed."""
    return bool(block_candidates(mask, block, block).any())


def active_blocks(mask: MaskSpec, block_q: int, block_k: int) -> list[list[torch.Tensor]]:
    """For each batch row and query block, the key indices of the key blocks that may be
    non-empty (see ``block_candidates``).

    Returns ``plan[b][iq]`` = 1-D int64 tensor of key indices (possibly empty).
    """
    ok = block_candidates(mask, block_q, block_k)
    tk = mask.k_pos.shape[0]
    plan = []
    for okb in ok:
        rows = []
        for iq in range(okb.shape[0]):
            ks = okb[iq].nonzero().flatten()
            if ks.numel() == 0:
                rows.append(ks)
                continue
            idx = (ks[:, None] * block_k + torch.arange(block_k)[None, :]).flatten()
            rows.append(idx[idx < tk])
        plan.append(rows)
    return plan


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[tk, Hkv, D] -> [H, tk, D] with each kv head repeated ``groups`` times."""
    return x.repeat_interleave(groups, dim=1).transpose(0, 1) if groups > 1 else x.transpose(0, 1)


def _fold_kv_grad(g: torch.Tensor, groups: int) -> torch.Tensor:
    """[H, tk, D] -> [tk, Hkv, D], summing the query heads that share a kv head."""
    h, tk, d = g.shape
    return g.reshape(h // groups, groups, tk, d).sum(1).transpose(0, 1)


def _no_autocast(fn):
    """Kernels choose their own precision (fp32 accumulation) whatever autocast says."""

    def wrapped(*args, **kwargs):
        with torch.autocast(args[0].device.type, enabled=False):
            return fn(*args, **kwargs)

    wrapped.__doc__, wrapped.__name__ = fn.__doc__, fn.__name__
    return wrapped


@_no_autocast
def attention_forward(
    q, k, v, mask: MaskSpec, scale: float | None = None, block: int = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (o [B, Tq, H, D] in q.dtype, lse [B, H, Tq] in fp32 or fp64)."""
    bsz, tq, h, d = q.shape
    groups = h // k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    o = torch.zeros(bsz, tq, h, d, dtype=acc, device=q.device)
    lse = torch.full((bsz, h, tq), -math.inf, dtype=acc, device=q.device)
    plan = active_blocks(mask, block, block)
    for b in range(bsz):
        for iq, kidx in enumerate(plan[b]):
            if kidx.numel() == 0:
                continue
            qs = slice(iq * block, min(tq, (iq + 1) * block))
            allowed = mask.allowed(qs, kidx, b)  # [tq, tk]
            qb = q[b, qs].transpose(0, 1).to(acc)  # [H, tq, D]
            kb = _expand_kv(k[b, kidx].to(acc), groups)  # [H, tk, D]
            vb = _expand_kv(v[b, kidx].to(acc), groups)
            s = torch.matmul(qb, kb.transpose(1, 2)) * scale  # [H, tq, tk]
            s = s.masked_fill(~allowed, -math.inf)
            m = torch.logsumexp(s, dim=-1)  # [H, tq]
            p = torch.exp(s - torch.where(torch.isinf(m), 0.0, m)[..., None])
            o[b, qs] = torch.matmul(p, vb).transpose(0, 1)
            lse[b, :, qs] = m
    return o.to(q.dtype), lse


@_no_autocast
def attention_backward(do, q, k, v, o, lse, mask: MaskSpec, scale: float | None = None, block: int = DEFAULT_BLOCK):
    """Gradients (dq, dk, dv) of ``o`` for one (Q, K) block pair, recomputed from ``lse``.

    ``o`` and ``lse`` may be the merged output / lse over several key chunks (ring
    attention): then the returned gradients are this key chunk's exact share.
    """
    bsz, tq, h, d = q.shape
    groups = h // k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    delta = (do.to(acc) * o.to(acc)).sum(-1).transpose(1, 2)  # [B, H, Tq]
    plan = active_blocks(mask, block, block)
    for b in range(bsz):
        for iq, kidx in enumerate(plan[b]):
            if kidx.numel() == 0:
                continue
            qs = slice(iq * block, min(tq, (iq + 1) * block))
            allowed = mask.allowed(qs, kidx, b)
            qb = q[b, qs].transpose(0, 1).to(acc)  # [H, tq, D]
            kb = _expand_kv(k[b, kidx].to(acc), groups)  # [H, tk, D]
            vb = _expand_kv(v[b, kidx].to(acc), groups)
            dob = do[b, qs].transpose(0, 1).to(acc)  # [H, tq, D]
            m = lse[b, :, qs]
            s = torch.matmul(qb, kb.transpose(1, 2)) * scale
            p = torch.exp(s - torch.where(torch.isinf(m), 0.0, m)[..., None])
            p = p.masked_fill(~allowed, 0.0)
            dp = torch.matmul(dob, vb.transpose(1, 2))  # [H, tq, tk]
            ds = p * (dp - delta[b, :, qs][..., None])
            dq[b, qs] += torch.matmul(ds, kb).transpose(0, 1) * scale
            dk[b].index_add_(0, kidx, _fold_kv_grad(torch.matmul(ds.transpose(1, 2), qb) * scale, groups))
            dv[b].index_add_(0, kidx, _fold_kv_grad(torch.matmul(p.transpose(1, 2), dob), groups))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale, block):
        o, lse = attention_forward(q, k, v, mask, scale, block)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.mask, ctx.scale, ctx.block = mask, scale, block
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(do, q, k, v, o, lse, ctx.mask, ctx.scale, ctx.block)
        return dq, dk, dv, None, None, None


def attention(
    q, k, v, mask: MaskSpec, scale: float | None = None, block: int = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable block-sparse attention. Returns (o, lse); lse carries no gradient.
    On CUDA in half precision with flash-attn installed, same-run pairs use flash-attn."""
    if q.is_cuda:
        from models.ops import flash

        if flash.available() and flash.applicable(q, mask):
            return flash.flash_attention(q, k, v, mask, scale)
    return _Attention.apply(q, k, v, mask, scale, block)


def attention_ref(q, k, v, mask: MaskSpec, scale: float | None = None):
    """Naive dense reference: materialises the full [B, H, Tq, Tk] mask. Autograd only."""
    bsz, tq, h, d = q.shape
    groups = h // k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kk = k.repeat_interleave(groups, dim=2)
    vv = v.repeat_interleave(groups, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    allowed = torch.stack([mask.allowed(slice(None), torch.arange(k.shape[1]), b) for b in range(bsz)])
    s = s.masked_fill(~allowed[:, None], -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", p, vv), lse
