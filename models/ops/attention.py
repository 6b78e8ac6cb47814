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

Plan (per batch row, ``span_plan``): queries and keys split into runs of consecutive
positions inside one document; each same-document (query run, key run) pair becomes at most
two pieces, so packed documents compute only their own blocks:
    "full"    every pair allowed (keys wholly before the queries, or not causal)
    "causal"  the diagonal part, key j <= query i, both sides starting at the same position
    "band"    anything a sliding window cuts: a tile loop over ``block`` queries whose keys
              are clipped to the band and masked only in tiles the band cuts
On CPU, "full" and "causal" pieces run in PyTorch's fused flash attention
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward: fp32/fp64/bf16,
natively GQA, top-left causal, natural-log lse); pieces on the same query rows are merged
by log-sum-exp. Positions that break into very many runs (more than ``MAX_PIECES`` pairs)
use the generic fixed-block plan (``active_blocks``). Rows that see no key produce zeros
(and lse = -inf), never NaN. The kernel computes in fp32 (fp64 for fp64 inputs); half
precision inputs whose pieces all run in the fused op go to it as they are (it accumulates in
fp32, as SDPA does under autocast), without fp32 copies of q, k, v (and do, o in backward).

Backward recomputes probabilities from the saved lse (flash-attention style), so a CP
strategy can call :func:`attention_backward` with the *merged* output and lse of several
blocks and get exact per-block gradients.

Per-head block patterns (S2, models/s2_pattern.py): ``MaskSpec.pattern`` adds, per KV head,
``pattern.active(i // b, j // b, hk)`` at block size b = ``pattern.block`` (``hk`` the
*global* KV head: ``MaskSpec.kv_heads`` maps local KV heads to global ones when a strategy
holds a slice of the heads, e.g. Ulysses). The kernel then works per group of KV heads with
the same layout and, with query tiles of ``pattern.block`` tokens, gathers for each tile only
the key tiles the pattern and the mask leave non-empty: its work is proportional to the
active blocks (``planned_pairs`` counts it); inactive blocks are never computed.
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


def _pattern_pairs(mask: MaskSpec, block: int, n_heads: int, n_kv: int) -> int:
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


# ----------------------------------------------------------------------------- span plan
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
MAX_PIECES = 4096  # more (query run, key run) pairs than this: use the generic block plan


@dataclass(frozen=True)
class Piece:
    """One rectangle of a row's plan: queries ``qs`` against keys ``ks`` (slices of the
    tensor index), inside one document, where both sides are runs of consecutive positions
    starting at ``q0`` / ``k0``. kind:
        "full"    every pair is allowed
        "causal"  key j allowed iff j <= i, with q0 == k0 (a diagonal square or a taller
                  rectangle: top-left aligned, every query sees at least one key)
        "band"    the mask's causal / window rule, evaluated per tile from positions
    """

    qs: slice
    ks: slice
    q0: int
    k0: int
    kind: str


def _runs(pos: torch.Tensor, doc: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """Maximal runs of consecutive positions inside one document: (start, length, first
    position, doc id) for pos [T], doc [T]."""
    t = pos.shape[0]
    if t == 0:
        return []
    brk = (pos[1:] != pos[:-1] + 1) | (doc[1:] != doc[:-1])
    starts = torch.cat([pos.new_zeros(1), brk.nonzero().flatten() + 1])
    lengths = torch.diff(starts, append=starts.new_tensor([t]))
    return list(zip(starts.tolist(), lengths.tolist(), pos[starts].tolist(), doc[starts].tolist()))


def _pair_pieces(qr, kr, causal: bool, window: int | None) -> list[Piece]:
    """Pieces of one (query run, key run) pair of the same document; [] if nothing is allowed."""
    qs, ql, qp, _ = qr
    ks, kl, kp, _ = kr
    qhi, khi = qp + ql - 1, kp + kl - 1
    if causal and kp > qhi:
        return []
    whole = Piece(slice(qs, qs + ql), slice(ks, ks + kl), qp, kp, "full")
    if window is not None:
        near = max(0, qp - khi) if causal else max(0, qp - khi, kp - qhi)
        far = qhi - kp if causal else max(qhi - kp, khi - qp)
        if near >= window:
            return []
        if far < window and (khi <= qp or not causal):
            return [whole]
        return [Piece(whole.qs, whole.ks, qp, kp, "band")]
    if not causal:
        return [whole]
    pieces = []
    if kp < qp:  # keys before the first query: every query sees them
        n = min(khi, qp - 1) - kp + 1
        pieces.append(Piece(whole.qs, slice(ks, ks + n), qp, kp, "full"))
    a = max(kp, qp)  # the diagonal part starts at position a on both sides
    if a <= min(khi, qhi):
        tk = min(khi, qhi) - a + 1
        pieces.append(Piece(slice(qs + a - qp, qs + ql), slice(ks + a - kp, ks + a - kp + tk), a, a, "causal"))
    return pieces


def span_plan(mask: MaskSpec, b: int) -> list[Piece] | None:
    """The pieces that cover every allowed pair of batch row b exactly once, or None when the
    positions break into so many runs that the generic block plan is cheaper."""
    qruns = _runs(mask.q_pos, mask.q_doc[b])
    kruns = _runs(mask.k_pos, mask.k_doc[b])
    by_doc: dict[int, list] = {}
    for r in kruns:
        by_doc.setdefault(r[3], []).append(r)
    if sum(len(by_doc.get(r[3], ())) for r in qruns) > MAX_PIECES:
        return None
    return [p for qr in qruns for kr in by_doc.get(qr[3], ()) for p in _pair_pieces(qr, kr, mask.causal, mask.window)]


def _span_pairs(mask: MaskSpec, block: int = DEFAULT_BLOCK) -> int:
    """Number of (query, key) pairs the kernel computes for an unpatterned ``mask`` (all rows)."""
    total = 0
    for b in range(mask.q_doc.shape[0]):
        plan = span_plan(mask, b)
        if plan is None:
            total += sum(len(kidx) * block for kidx in active_blocks(mask, block, block)[b])
            continue
        for p in plan:
            tq, tk = p.qs.stop - p.qs.start, p.ks.stop - p.ks.start
            total += tq * (tk + 1) // 2 if p.kind == "causal" and tq == tk else tq * tk
    return total


# ----------------------------------------------------------------------------- tiles
def _tile_forward(qt, kt, vt, allowed, scale):
    """Softmax over one tile. qt [tq, H, D], kt, vt [tk, Hkv, D], allowed [tq, tk] bool or
    None (all allowed). Returns (o [tq, H, D], lse [H, tq]); rows seeing nothing: 0, -inf.
    GQA without copies of K/V: the query heads of one kv head are stacked along rows."""
    tq, h, d = qt.shape
    hkv = kt.shape[1]
    qh = qt.transpose(0, 1).reshape(hkv, h // hkv * tq, d) * scale  # [Hkv, g*tq, D]
    s = torch.matmul(qh, kt.permute(1, 2, 0))  # [Hkv, g*tq, tk]
    if allowed is not None:
        s.view(hkv, h // hkv, tq, -1).masked_fill_(~allowed, -math.inf)
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
        p.view(hkv, h // hkv, tq, -1).masked_fill_(~allowed, 0.0)
    dv = torch.matmul(p.transpose(1, 2), doh)
    ds = torch.matmul(doh, vh.transpose(1, 2)).sub_(delta_t.reshape(hkv, rows, 1)).mul_(p)
    dq = torch.matmul(ds, kh).mul_(scale).reshape(h, tq, d).transpose(0, 1)
    dk = torch.matmul(ds.transpose(1, 2), qh)
    return dq, dk.transpose(0, 1), dv.transpose(0, 1)


def _band_tiles(p: Piece, causal: bool, window: int | None, block: int, device):
    """Tiles of a piece for the tile loop: (query slice, key slice, allowed or None), slices
    relative to the piece. Keys are clipped to each tile's band; masks only where partial."""
    tq, tk = p.qs.stop - p.qs.start, p.ks.stop - p.ks.start
    if p.kind == "causal":
        causal, window = True, None
    for t0 in range(0, tq, block):
        t1 = min(tq, t0 + block)
        if p.kind == "full":
            yield slice(t0, t1), slice(0, tk), None
            continue
        lo_i, hi_i = p.q0 + t0, p.q0 + t1 - 1  # tile's query positions
        lo = p.k0 if window is None else max(p.k0, lo_i - window + 1)
        hi = hi_i if causal else (hi_i + window - 1 if window is not None else p.k0 + tk - 1)
        hi = min(hi, p.k0 + tk - 1)
        if lo > hi:
            continue
        near_ok = (not causal) or hi <= lo_i
        far = hi_i - lo if causal else max(hi_i - lo, hi - lo_i)
        allowed = None
        if not (near_ok and (window is None or far < window)):
            qp = torch.arange(lo_i, hi_i + 1)[:, None]
            kp = torch.arange(lo, hi + 1)[None, :]
            allowed = torch.ones(qp.shape[0], kp.shape[1], dtype=torch.bool)
            if causal:
                allowed &= kp <= qp
            if window is not None:
                allowed &= ((qp - kp) if causal else (qp - kp).abs()) < window
            allowed = allowed.to(device)
        yield slice(t0, t1), slice(lo - p.k0, hi - p.k0 + 1), allowed


def _fused(p: Piece, x: torch.Tensor) -> bool:
    """Whether a piece runs in PyTorch's fused CPU flash attention (dense, no mask)."""
    return p.kind != "band" and x.device.type == "cpu" and _FLASH_CPU is not None


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[t, H, D] -> [1, H, t, D] view, the layout of the fused op."""
    return x.transpose(0, 1)[None]


def _piece_forward(qt, kt, vt, p: Piece, mask: MaskSpec, scale, block):
    """(o [tq, H, D], lse [H, tq]) of one piece: fused op, or the tile loop."""
    if _fused(p, qt):
        o, lse = _FLASH_CPU(_heads_first(qt), _heads_first(kt), _heads_first(vt), 0.0, p.kind == "causal", scale=scale)
        return o[0].transpose(0, 1), lse[0]
    o = qt.new_zeros(qt.shape)
    lse = qt.new_full((qt.shape[1], qt.shape[0]), -math.inf)
    for rs, ksl, allowed in _band_tiles(p, mask.causal, mask.window, block, qt.device):
        o[rs], lse[:, rs] = _tile_forward(qt[rs], kt[ksl], vt[ksl], allowed, scale)
    return o, lse


def _piece_backward(dot, qt, kt, vt, ot, lse_t, delta_t, p: Piece, mask: MaskSpec, scale, block):
    """(dq [tq, H, D], dk, dv [tk, Hkv, D]) of one piece from the merged ot / lse_t."""
    if _fused(p, qt):
        dq, dk, dv = _FLASH_CPU_BWD(
            _heads_first(dot),
            _heads_first(qt),
            _heads_first(kt),
            _heads_first(vt),
            _heads_first(ot),
            lse_t[None],
            0.0,
            p.kind == "causal",
            scale=scale,
        )
        return dq[0].transpose(0, 1), dk[0].transpose(0, 1), dv[0].transpose(0, 1)
    dq, dk, dv = torch.zeros_like(qt), torch.zeros_like(kt), torch.zeros_like(vt)
    for rs, ksl, allowed in _band_tiles(p, mask.causal, mask.window, block, qt.device):
        gq, gk, gv = _tile_backward(qt[rs], kt[ksl], vt[ksl], dot[rs], lse_t[:, rs], delta_t[:, rs], allowed, scale)
        dq[rs] += gq
        dk[ksl] += gk
        dv[ksl] += gv
    return dq, dk, dv


def _whole(plan: list[Piece] | None, tq: int, tk: int) -> bool:
    """Whether a row's plan is one piece over all its queries and keys."""
    return plan is not None and len(plan) == 1 and plan[0].qs == slice(0, tq) and plan[0].ks == slice(0, tk)


def _merge_into(o, lse, qs, o_p, lse_p, seen):
    """Write (o_p [tq, H, D], lse_p [H, tq]) into rows ``qs`` of o [Tq, H, D], lse [H, Tq],
    merging by log-sum-exp with earlier pieces on the same rows (``seen`` [Tq] bool)."""
    if not bool(seen[qs].any()):
        o[qs], lse[:, qs] = o_p, lse_p
    else:
        old = lse[:, qs]
        new = torch.logaddexp(old, lse_p)
        safe = torch.where(torch.isinf(new), 0.0, new)
        w_old, w_new = torch.exp(old - safe).T[..., None], torch.exp(lse_p - safe).T[..., None]
        o[qs] = o[qs] * w_old + o_p * w_new
        lse[:, qs] = new
    seen[qs] = True


# ----------------------------------------------------------------------------- kernel
def _patterned(mask: MaskSpec) -> bool:
    """A per-head block pattern that leaves some block inactive (an all-dense one is the
    plain mask)."""
    return mask.pattern is not None and not getattr(mask.pattern, "all_dense", False)


def _acc(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _run_dtype(q: torch.Tensor, plans) -> torch.dtype:
    """The dtype the pieces get: half inputs stay half when every piece of every row runs in
    the fused op (it accumulates in fp32 and returns an fp32 lse; outputs are merged into fp32
    buffers); otherwise the accumulation dtype."""
    half = q.dtype in (torch.float16, torch.bfloat16)
    if half and all(plan is not None and all(_fused(p, q) for p in plan) for plan in plans):
        return q.dtype
    return _acc(q)


@_no_autocast
def attention_forward(
    q, k, v, mask: MaskSpec, scale: float | None = None, block: int = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (o [B, Tq, H, D] in q.dtype, lse [B, H, Tq] in fp32 or fp64).
    Each row runs its span plan (fused dense pieces, tiled band pieces); rows whose positions
    break into too many runs use the generic block plan; masks with a per-head block pattern
    (S2) run the pattern's tile plan."""
    if _patterned(mask):
        return _pattern_forward(q, k, v, mask, scale, block)
    bsz, tq, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = _acc(q)
    plans = [span_plan(mask, b) for b in range(bsz)]
    run = _run_dtype(q, plans)
    qa, ka, va = q.to(run), k.to(run), v.to(run)
    if bsz == 1 and _whole(plans[0], tq, k.shape[1]):  # one piece: no buffers, no copies
        o_p, lse_p = _piece_forward(qa[0], ka[0], va[0], plans[0][0], mask, scale, block)
        return o_p[None].to(q.dtype), lse_p[None].contiguous()
    o = torch.zeros(bsz, tq, h, d, dtype=acc, device=q.device)
    lse = torch.full((bsz, h, tq), -math.inf, dtype=acc, device=q.device)
    for b, plan in enumerate(plans):
        if plan is None:
            _generic_forward(qa, ka, va, mask, scale, block, b, o, lse)
            continue
        seen = torch.zeros(tq, dtype=torch.bool)
        for p in plan:
            o_p, lse_p = _piece_forward(qa[b, p.qs], ka[b, p.ks], va[b, p.ks], p, mask, scale, block)
            _merge_into(o[b], lse[b], p.qs, o_p, lse_p, seen)
    return o.to(q.dtype), lse


@_no_autocast
def attention_backward(do, q, k, v, o, lse, mask: MaskSpec, scale: float | None = None, block: int = DEFAULT_BLOCK):
    """Gradients (dq, dk, dv) of ``o`` for one (Q, K) block pair, recomputed from ``lse``.

    ``o`` and ``lse`` may be the merged output / lse over several key chunks (ring
    attention): then the returned gradients are this key chunk's exact share (every path
    uses the given lse and delta = rowsum(do * o), never its own normalisation).
    """
    if _patterned(mask):
        return _pattern_backward(do, q, k, v, o, lse, mask, scale, block)
    bsz, tq, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = _acc(q)
    plans = [span_plan(mask, b) for b in range(bsz)]
    run = _run_dtype(q, plans)
    qa, ka, va, doa, oa = (x.to(run) for x in (q, k, v, do, o))
    lse = lse.to(acc)
    if bsz == 1 and _whole(plans[0], tq, k.shape[1]) and _fused(plans[0][0], qa):
        grads = _piece_backward(doa[0], qa[0], ka[0], va[0], oa[0], lse[0], None, plans[0][0], mask, scale, block)
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
            gq, gk, gv = _piece_backward(
                doa[b, p.qs],
                qa[b, p.qs],
                ka[b, p.ks],
                va[b, p.ks],
                oa[b, p.qs],
                lse[b, :, p.qs],
                None if delta is None else delta[b, :, p.qs],
                p,
                mask,
                scale,
                block,
            )
            dq[b, p.qs] += gq
            dk[b, p.ks] += gk
            dv[b, p.ks] += gv
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _key_slice(kidx: torch.Tensor):
    """A slice when the key indices are one contiguous range, else the index tensor."""
    lo, n = int(kidx[0]), kidx.numel()
    return slice(lo, lo + n) if int(kidx[-1]) - lo + 1 == n else kidx


def _generic_tiles(mask: MaskSpec, block: int, b: int, tq: int):
    """The fixed-size block plan (``active_blocks``) of batch row b: (query slice, key slice or
    indices, allowed mask [tq, tk] or None when every pair is allowed) per non-empty tile."""
    for iq, kidx in enumerate(active_blocks(mask, block, block)[b]):
        if kidx.numel() == 0:
            continue
        qs = slice(iq * block, min(tq, (iq + 1) * block))
        allowed = mask.allowed(qs, kidx, b)
        yield qs, _key_slice(kidx), None if bool(allowed.all()) else allowed


def _generic_forward(qa, ka, va, mask, scale, block, b, o, lse):
    """Fixed-size block plan for batch row b, writing into o and lse."""
    for qs, ks, allowed in _generic_tiles(mask, block, b, qa.shape[1]):
        o[b, qs], lse[b, :, qs] = _tile_forward(qa[b, qs], ka[b, ks], va[b, ks], allowed, scale)


def _generic_backward(doa, qa, ka, va, lse, delta, mask, scale, block, b, dq, dk, dv):
    """Backward of ``_generic_forward`` for batch row b, accumulating into dq, dk, dv."""
    for qs, ks, allowed in _generic_tiles(mask, block, b, qa.shape[1]):
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


def _tile_mask(mask: MaskSpec, qs: slice, kidx: torch.Tensor, b: int, head: int | None) -> torch.Tensor:
    """bool [tq, tk]: the token mask of one tile, with the group's block pattern if any."""
    allowed = mask.allowed(qs, kidx, b)
    return allowed if head is None else allowed & mask.pattern_allowed(qs, kidx, head)


def _pattern_forward(
    q, k, v, mask: MaskSpec, scale: float | None = None, block: int = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_forward`` for a mask with a per-head block pattern: per group of KV heads with
    one layout, tiles of ``pattern.block`` queries against only their active key tiles."""
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


def _pattern_backward(do, q, k, v, o, lse, mask: MaskSpec, scale: float | None = None, block: int = DEFAULT_BLOCK):
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


def planned_pairs(mask: MaskSpec, block: int = DEFAULT_BLOCK, n_heads: int = 1, n_kv: int = 1) -> int:
    """(query head, query, key) score entries the kernel computes for ``mask`` (all rows): its
    FLOPs are 4 * D times this in forward (scores and values), twice that in backward. Without
    a pattern the span plan computes exactly the allowed pairs (per head); with an S2 pattern,
    every active tile pair whole."""
    if _patterned(mask):
        return _pattern_pairs(mask, block, n_heads, n_kv)
    return _span_pairs(mask, block) * n_heads
