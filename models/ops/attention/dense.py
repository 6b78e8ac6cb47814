"""The dense path of softmax attention (masks without a per-head block pattern), in plain PyTorch.

Shapes:
    q        [B, Tq, H, D]       queries
    k, v     [B, Tk, Hkv, D]     keys / values, H % Hkv == 0 (GQA)
    o        [B, Tq, H, D]
    lse      [B, H, Tq]  fp32/fp64, -inf where a query row sees no key

Each row runs its span plan (plan.py): "full" and "causal" pieces run in a fused kernel
(fused.py: PyTorch's CPU flash attention; on CUDA flash-attn or PyTorch's flash / memory-
efficient attention; each with a backward from the merged lse), "band" pieces in a tile loop;
pieces on the same query rows are merged by log-sum-exp. Rows whose positions break into too
many runs use the generic fixed-block plan. Rows that see no key produce zeros (and lse =
-inf), never NaN. The kernel computes in fp32 (fp64 for fp64 inputs); half precision inputs
whose pieces all run in the fused op go to it as they are (it accumulates in fp32, as SDPA
does under autocast), without fp32 copies of q, k, v (and do, o in backward).
"""

from __future__ import annotations

import math

import torch

from models.ops.attention import fused
from models.ops.attention.plan import DEFAULT_BLOCK, MaskSpec, Piece, active_blocks, band_tiles, span_plan
from models.ops.common import acc_dtype, merge_lse


def _per_kv(allowed: torch.Tensor, hkv: int) -> torch.Tensor:
    """allowed [tq, tk] (every head) or [H, tq, tk] -> broadcastable to [Hkv, H / Hkv, tq, tk]."""
    return allowed if allowed.dim() == 2 else allowed.view(hkv, -1, *allowed.shape[1:])


def _tile_forward(qt, kt, vt, allowed, scale):
    """Softmax over one tile. qt [tq, H, D], kt, vt [tk, Hkv, D], allowed [tq, tk] bool or
    None (all allowed). Returns (o [tq, H, D], lse [H, tq]); rows seeing nothing: 0, -inf.
    GQA without copies of K/V: the query heads of one kv head are stacked along rows."""
    tq, h, d = qt.shape
    hkv = kt.shape[1]
    qh = qt.transpose(0, 1).reshape(hkv, h // hkv * tq, d) * scale  # [Hkv, g*tq, D]
    s = torch.matmul(qh, kt.permute(1, 2, 0))  # [Hkv, g*tq, tk]
    if allowed is not None:
        s.view(hkv, h // hkv, tq, -1).masked_fill_(~_per_kv(allowed, hkv), -math.inf)
    m = s.amax(-1, keepdim=True)
    if allowed is not None:
        m.masked_fill_(torch.isinf(m), 0.0)
    p = s.sub_(m).exp_()
    den = p.sum(-1, keepdim=True)  # >= 1 if any allowed
    o = torch.matmul(p, vt.transpose(0, 1)).div_(den.clamp(min=1.0))
    lse = (m + torch.log(den)).reshape(h, tq)
    return o.reshape(h, tq, d).transpose(0, 1), lse


def _tile_backward(qt, kt, vt, dot, lse_t, delta_t, allowed, scale):
    """Gradients of one tile from the (possibly merged) lse_t [H, tq] and delta_t [H, tq].
    Returns dq [tq, H, D], dk, dv [tk, Hkv, D]."""
    tq, h, d = qt.shape
    hkv = kt.shape[1]
    rows = h // hkv * tq
    qh = qt.transpose(0, 1).reshape(hkv, rows, d) * scale
    kh, vh = kt.transpose(0, 1), vt.transpose(0, 1)  # [Hkv, tk, D]
    doh = dot.transpose(0, 1).reshape(hkv, rows, d)
    m = lse_t.reshape(hkv, rows, 1)
    p = torch.matmul(qh, kh.transpose(1, 2)).sub_(torch.where(torch.isinf(m), 0.0, m)).exp_()
    if allowed is not None:
        p.view(hkv, h // hkv, tq, -1).masked_fill_(~_per_kv(allowed, hkv), 0.0)
    dv = torch.matmul(p.transpose(1, 2), doh)
    ds = torch.matmul(doh, vh.transpose(1, 2)).sub_(delta_t.reshape(hkv, rows, 1)).mul_(p)
    dq = torch.matmul(ds, kh).mul_(scale).reshape(h, tq, d).transpose(0, 1)
    dk = torch.matmul(ds.transpose(1, 2), qh)
    return dq, dk.transpose(0, 1), dv.transpose(0, 1)


def _fused(p: Piece, x: torch.Tensor) -> bool:
    """Whether a piece runs in a fused kernel (dense, no mask; fused.py picks it by device)."""
    return p.form != "band" and fused.supports(x)


def _piece_forward(qt, kt, vt, p: Piece, scale, block):
    """(o [tq, H, D], lse [H, tq]) of one piece: fused op, or the tile loop."""
    if _fused(p, qt):
        return fused.fused_forward(qt, kt, vt, p.form == "causal", scale)
    o = qt.new_zeros(qt.shape)
    lse = qt.new_full((qt.shape[1], qt.shape[0]), -math.inf)
    for rs, ksl, allowed in band_tiles(p, block):
        allowed = None if allowed is None else allowed.to(qt.device)
        o[rs], lse[:, rs] = _tile_forward(qt[rs], kt[ksl], vt[ksl], allowed, scale)
    return o, lse


def _piece_backward(dot, qt, kt, vt, ot, lse_t, delta_t, p: Piece, scale, block):
    """(dq [tq, H, D], dk, dv [tk, Hkv, D]) of one piece from the merged ot / lse_t."""
    if _fused(p, qt):
        return fused.fused_backward(dot, qt, kt, vt, ot, lse_t, p.form == "causal", scale)
    dq, dk, dv = torch.zeros_like(qt), torch.zeros_like(kt), torch.zeros_like(vt)
    for rs, ksl, allowed in band_tiles(p, block):
        allowed = None if allowed is None else allowed.to(qt.device)
        gq, gk, gv = _tile_backward(qt[rs], kt[ksl], vt[ksl], dot[rs], lse_t[:, rs], delta_t[:, rs], allowed, scale)
        dq[rs] += gq
        dk[ksl] += gk
        dv[ksl] += gv
    return dq, dk, dv


def _head_index(heads, h: int, hkv: int):
    """(query heads, kv heads) index tensors of a piece on local query heads ``heads`` (None: all
    of them -> (None, None)). Whole GQA groups keep their kv heads once; otherwise every query
    head gets its own copy of its kv head (kv index repeats; gradients are index-added)."""
    if heads is None:
        return None, None
    g = h // hkv
    qi = torch.tensor(heads, dtype=torch.int64)
    kv = sorted(set(x // g for x in heads))
    if len(heads) == len(kv) * g:  # whole groups, in order
        return qi, torch.tensor(kv, dtype=torch.int64)
    return qi, qi // g


def _whole(plan: list[Piece] | None, tq: int, tk: int) -> bool:
    """Whether a row's plan is one piece over all its queries and keys."""
    return (
        plan is not None
        and len(plan) == 1
        and plan[0].heads is None
        and plan[0].qs == slice(0, tq)
        and plan[0].ks == slice(0, tk)
    )


def _merge_into(o, lse, qs, qi, o_p, lse_p, seen):
    """Write (o_p [tq, h, D], lse_p [h, tq]) into rows ``qs`` of o [Tq, H, D], lse [H, Tq] for
    query heads ``qi`` (None: all), merging by log-sum-exp with earlier pieces on the same rows
    and heads (``seen`` [H, Tq] bool)."""
    if qi is None:
        if not bool(seen[:, qs].any()):
            o[qs], lse[:, qs] = o_p, lse_p
        else:
            o[qs], lse[:, qs] = merge_lse(o[qs], lse[:, qs], o_p, lse_p)
        seen[:, qs] = True
        return
    ov, lv = o[qs], lse[:, qs]  # views; index assignment writes through them
    if bool(seen[qi][:, qs].any()):
        o_p, lse_p = merge_lse(ov[:, qi], lv[qi], o_p, lse_p)
    ov[:, qi], lv[qi] = o_p.to(ov.dtype), lse_p.to(lv.dtype)
    seen[:, qs][qi] = True


def _run_dtype(q: torch.Tensor, plans) -> torch.dtype:
    """The dtype the pieces get: half inputs stay half when every piece of every row runs in
    the fused op (it accumulates in fp32 and returns an fp32 lse; outputs are merged into fp32
    buffers); otherwise the accumulation dtype."""
    half = q.dtype in (torch.float16, torch.bfloat16)
    if half and all(plan is not None and all(_fused(p, q) for p in plan) for plan in plans):
        return q.dtype
    return acc_dtype(q)


def dense_forward(
    q, k, v, mask: MaskSpec, scale: float | None = None, block: int = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (o [B, Tq, H, D] in q.dtype, lse [B, H, Tq] in fp32 or fp64).
    Each row runs its span plan (fused dense pieces, tiled band pieces); rows whose positions
    break into too many runs use the generic block plan."""
    bsz, tq, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = acc_dtype(q)
    hkv = k.shape[2]
    plans = [span_plan(mask, b, h) for b in range(bsz)]
    run = _run_dtype(q, plans)
    qa, ka, va = q.to(run), k.to(run), v.to(run)
    if bsz == 1 and _whole(plans[0], tq, k.shape[1]):  # one piece: no buffers, no copies
        o_p, lse_p = _piece_forward(qa[0], ka[0], va[0], plans[0][0], scale, block)
        return o_p[None].to(q.dtype), lse_p[None].contiguous()
    o = torch.zeros(bsz, tq, h, d, dtype=acc, device=q.device)
    lse = torch.full((bsz, h, tq), -math.inf, dtype=acc, device=q.device)
    for b, plan in enumerate(plans):
        if plan is None:
            _generic_forward(qa, ka, va, mask, scale, block, b, o, lse)
            continue
        seen = torch.zeros(h, tq, dtype=torch.bool)
        for p in plan:
            qi, ki = _head_index(p.heads, h, hkv)
            qt, kt, vt = qa[b, p.qs], ka[b, p.ks], va[b, p.ks]
            if qi is not None:
                qt, kt, vt = qt[:, qi], kt[:, ki], vt[:, ki]
            o_p, lse_p = _piece_forward(qt, kt, vt, p, scale, block)
            _merge_into(o[b], lse[b], p.qs, qi, o_p, lse_p, seen)
    return o.to(q.dtype), lse


def dense_backward(do, q, k, v, o, lse, mask: MaskSpec, scale: float | None = None, block: int = DEFAULT_BLOCK):
    """Gradients (dq, dk, dv) of ``o`` for one (Q, K) block pair, recomputed from ``lse``.

    ``o`` and ``lse`` may be the merged output / lse over several key chunks (ring
    attention): then the returned gradients are this key chunk's exact share (every path
    uses the given lse and delta = rowsum(do * o), never its own normalisation).
    """
    bsz, tq, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = acc_dtype(q)
    hkv = k.shape[2]
    plans = [span_plan(mask, b, h) for b in range(bsz)]
    run = _run_dtype(q, plans)
    qa, ka, va, doa, oa = (x.to(run) for x in (q, k, v, do, o))
    lse = lse.to(acc)
    if bsz == 1 and _whole(plans[0], tq, k.shape[1]) and _fused(plans[0][0], qa):
        grads = _piece_backward(doa[0], qa[0], ka[0], va[0], oa[0], lse[0], None, plans[0][0], scale, block)
        return tuple(g[None].to(x.dtype) for g, x in zip(grads, (q, k, v)))
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    delta = None
    for b, plan in enumerate(plans):
        if delta is None and (plan is None or not all(_fused(p, qa) for p in plan)):
            delta = (doa * oa).sum(-1).transpose(1, 2)  # [B, H, Tq]
        if plan is None:
            _generic_backward(doa, qa, ka, va, lse, delta, mask, scale, block, b, dq, dk, dv)
            continue
        for p in plan:
            qi, ki = _head_index(p.heads, h, hkv)
            args = [doa[b, p.qs], qa[b, p.qs], ka[b, p.ks], va[b, p.ks], oa[b, p.qs]]
            lse_t, delta_t = lse[b, :, p.qs], None if delta is None else delta[b, :, p.qs]
            if qi is not None:
                args = [x[:, i] for x, i in zip(args, (qi, qi, ki, ki, qi))]
                lse_t, delta_t = lse_t[qi], None if delta_t is None else delta_t[qi]
            gq, gk, gv = _piece_backward(*args, lse_t, delta_t, p, scale, block)
            if qi is None:
                dq[b, p.qs] += gq
                dk[b, p.ks] += gk
                dv[b, p.ks] += gv
            else:  # kv heads may repeat (a head subset that is not whole GQA groups): add
                dq[b, p.qs].index_add_(1, qi, gq.to(acc))
                dk[b, p.ks].index_add_(1, ki, gk.to(acc))
                dv[b, p.ks].index_add_(1, ki, gv.to(acc))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _key_slice(kidx: torch.Tensor):
    """A slice when the key indices are one contiguous range, else the index tensor."""
    lo, n = int(kidx[0]), kidx.numel()
    return slice(lo, lo + n) if int(kidx[-1]) - lo + 1 == n else kidx


def _generic_tiles(mask: MaskSpec, block: int, b: int, tq: int, n_heads: int, device):
    """The fixed-size block plan (``active_blocks``) of batch row b: (query slice, key slice or
    indices, allowed mask [tq, tk] or None when every pair is allowed) per non-empty tile."""
    for iq, kidx in enumerate(active_blocks(mask, block, block)[b]):
        if kidx.numel() == 0:
            continue
        qs = slice(iq * block, min(tq, (iq + 1) * block))
        allowed = mask.allowed(qs, kidx, b, n_heads)  # on the mask's (CPU) device, like kidx
        ks = _key_slice(kidx)
        if not isinstance(ks, slice):
            ks = ks.to(device)  # index_add_ in backward needs the index on the gradient's device
        yield qs, ks, None if bool(allowed.all()) else allowed.to(device)


def _generic_forward(qa, ka, va, mask, scale, block, b, o, lse):
    """Fixed-size block plan for batch row b, writing into o and lse."""
    for qs, ks, allowed in _generic_tiles(mask, block, b, qa.shape[1], qa.shape[2], qa.device):
        o[b, qs], lse[b, :, qs] = _tile_forward(qa[b, qs], ka[b, ks], va[b, ks], allowed, scale)


def _generic_backward(doa, qa, ka, va, lse, delta, mask, scale, block, b, dq, dk, dv):
    """Backward of ``_generic_forward`` for batch row b, accumulating into dq, dk, dv."""
    for qs, ks, allowed in _generic_tiles(mask, block, b, qa.shape[1], qa.shape[2], qa.device):
        gq, gk, gv = _tile_backward(
            qa[b, qs],
            ka[b, ks],
            va[b, ks],
            doa[b, qs],
            lse[b, :, qs],
            delta[b, :, qs],
            allowed,
            scale,
        )
        dq[b, qs] += gq
        if isinstance(ks, slice):
            dk[b, ks] += gk
            dv[b, ks] += gv
        else:
            dk[b].index_add_(0, ks, gk)
            dv[b].index_add_(0, ks, gv)
