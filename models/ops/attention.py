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

Per-head block patterns (S2, models/s2_pattern.py): ``MaskSpec.pattern`` adds, per KV head,
``pattern.active(i // b, j // b, hk)`` at block size b = ``pattern.block`` (``hk`` the
*global* KV head: ``MaskSpec.kv_heads`` maps local KV heads to global ones when a strategy
holds a slice of the heads, e.g. Ulysses). The kernel then works per group of KV heads with
the same layout and, with query tiles of ``pattern.block`` tokens, gathers for each tile only
the key tiles the pattern and the mask leave non-empty: its work is proportional to the
active blocks (``planned_pairs`` counts it); inactive blocks are never computed.

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
    """Index metadata for one (Q chunk, K chunk) pair; see the module docstring.
    ``pattern``: optional per-KV-head block pattern (S2Pattern, BlockLayout); ``kv_heads``:
    the global KV head of each local one (None: local = global, 0..Hkv-1)."""

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    q_doc: torch.Tensor
    k_doc: torch.Tensor
    causal: bool = True
    window: int | None = None
    pattern: object | None = None
    kv_heads: tuple[int, ...] | None = None

    def global_head(self, local: int) -> int:
        return local if self.kv_heads is None else self.kv_heads[local]

    def pattern_allowed(self, qs: slice, kidx: torch.Tensor, head: int) -> torch.Tensor:
        """bool [tq, tk]: the block pattern of global KV head ``head`` at token level."""
        blk = self.pattern.block
        return self.pattern.active(self.q_pos[qs][:, None] // blk, self.k_pos[kidx][None, :] // blk, head)

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


def may_attend(mask: MaskSpec, block: int, n_kv: int = 1) -> bool:
    """False only if no (query, key) pair of the whole (Q, K) pair is allowed (for any of the
    ``n_kv`` local KV heads when the mask has a per-head pattern)."""
    if mask.pattern is not None:
        return bool(tile_candidates(mask, block, n_kv)[1].any())
    return bool(block_candidates(mask, block, block).any())


def _tile_blocks(pos: torch.Tensor, tile: int, blk: int) -> torch.Tensor:
    """[n_tiles, m] int64: the distinct pattern blocks (pos // blk) of each tile of ``tile``
    consecutive entries of ``pos``, padded with -1."""
    t = pos.shape[0]
    nt = (t + tile - 1) // tile
    b = torch.cat([pos // blk, (pos[-1:] // blk).expand(nt * tile - t)]).view(nt, tile)
    srt = b.sort(-1).values
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    out = torch.full((nt, int(new.sum(-1).max())), -1, dtype=torch.int64)
    return out.scatter_(1, new.cumsum(-1) - 1, srt)


def head_groups(mask: MaskSpec, n_kv: int) -> list[tuple[slice, int | None]]:
    """Runs of local KV heads with the same layout: [(local head slice, global head of the
    run, or None without a pattern)]. Without a pattern: one run of every head."""
    if mask.pattern is None:
        return [(slice(0, n_kv), None)]
    keys = [mask.pattern.group_key(mask.global_head(h)) for h in range(n_kv)]
    runs, start = [], 0
    for h in range(1, n_kv + 1):
        if h == n_kv or keys[h] != keys[start]:
            runs.append((slice(start, h), mask.global_head(start)))
            start = h
    return runs


def tile_candidates(mask: MaskSpec, block: int, n_kv: int):
    """(groups, ok): ``groups`` = head_groups; ``ok`` [B, G, nq, nk] bool, may query tile i and
    key tile j of row b hold an allowed pair for the heads of group g. Tiles are ``block``
    consecutive entries (``pattern.block`` when the mask has a pattern). Conservative."""
    if mask.pattern is not None:
        block = mask.pattern.block
    groups = head_groups(mask, n_kv)
    ok = block_candidates(mask, block, block)  # [B, nq, nk]
    if mask.pattern is None:
        return groups, ok[:, None]
    blk = mask.pattern.block
    qs, ks = _tile_blocks(mask.q_pos, block, blk), _tile_blocks(mask.k_pos, block, blk)
    valid = (qs[:, None, :, None] >= 0) & (ks[None, :, None, :] >= 0)
    per_group = [
        (mask.pattern.active(qs[:, None, :, None], ks[None, :, None, :], head) & valid).any(-1).any(-1)
        for _, head in groups
    ]
    return groups, ok[:, None] & torch.stack(per_group)[None]


def tile_plan(mask: MaskSpec, block: int, n_kv: int):
    """(groups, tile, plan): ``plan[b][g][iq]`` = (key indices (1-D int64, possibly empty) the
    kernel gathers for query tile ``iq`` of row b and head group g, whether the block pattern
    must be applied token by token: only when the query tile or one of its key tiles spans
    more than one pattern block; a single-block tile pair that is a candidate is wholly
    active); ``tile`` the query tile size."""
    groups, ok = tile_candidates(mask, block, n_kv)
    tile = mask.pattern.block if mask.pattern is not None else block
    tk = mask.k_pos.shape[0]
    if mask.pattern is not None:
        q_multi = (_tile_blocks(mask.q_pos, tile, tile)[:, 1:] >= 0).any(-1).tolist()
        k_multi = (_tile_blocks(mask.k_pos, tile, tile)[:, 1:] >= 0).any(-1)
    plan = []
    for okb in ok:
        per_group = []
        for okg in okb:
            rows = []
            for iq in range(okg.shape[0]):
                ks = okg[iq].nonzero().flatten()
                idx = (ks[:, None] * tile + torch.arange(tile)[None, :]).flatten()
                masked = mask.pattern is not None and (q_multi[iq] or bool(k_multi[ks].any()))
                rows.append((idx[idx < tk], masked))
            per_group.append(rows)
        plan.append(per_group)
    return groups, tile, plan


def planned_pairs(mask: MaskSpec, block: int, n_heads: int, n_kv: int) -> int:
    """(query head, query, key) score entries the kernel computes for this mask: its FLOPs are
    4 * D times this in forward (scores and values), twice that in backward."""
    groups, tile, plan = tile_plan(mask, block, n_kv)
    tq = mask.q_pos.shape[0]
    per_kv = n_heads // n_kv
    total = 0
    for rows in plan:
        for (hs, _), tiles in zip(groups, rows):
            for iq, (kidx, _) in enumerate(tiles):
                total += (min(tq, (iq + 1) * tile) - iq * tile) * kidx.numel() * (hs.stop - hs.start) * per_kv
    return total


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


def _tile_mask(mask: MaskSpec, qs: slice, kidx: torch.Tensor, b: int, head: int | None) -> torch.Tensor:
    """bool [tq, tk]: the token mask of one tile, with the group's block pattern if any."""
    allowed = mask.allowed(qs, kidx, b)
    return allowed if head is None else allowed & mask.pattern_allowed(qs, kidx, head)


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
    On CUDA in half precision with flash-attn installed, same-run pairs use flash-attn; masks
    with an S2 pattern use FlexAttention (models/ops/flex.py)."""
    if q.is_cuda:
        from models.ops import flash, flex

        if flash.available() and flash.applicable(q, mask):
            return flash.flash_attention(q, k, v, mask, scale)
        if flex.available() and flex.applicable(q, mask):  # S2 patterns: FlexAttention BlockMask
            return flex.flex_attention(q, k, v, mask, scale)
    return _Attention.apply(q, k, v, mask, scale, block)


def attention_ref(q, k, v, mask: MaskSpec, scale: float | None = None):
    """Naive dense reference: materialises the full [B, H, Tq, Tk] mask. Autograd only."""
    bsz, tq, h, d = q.shape
    groups = h // k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kk = k.repeat_interleave(groups, dim=2)
    vv = v.repeat_interleave(groups, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    kidx = torch.arange(k.shape[1])
    allowed = torch.stack([mask.allowed(slice(None), kidx, b) for b in range(bsz)])[:, None]  # [B, 1, Tq, Tk]
    if mask.pattern is not None:  # per query head: the pattern of its kv head
        heads = [mask.pattern_allowed(slice(None), kidx, mask.global_head(hq // groups)) for hq in range(h)]
        allowed = allowed & torch.stack(heads)[None]  # [B, H, Tq, Tk]
    s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", p, vv), lse
