"""Which (query, key) pairs softmax attention computes: the mask, and the plans the kernel runs.

Shapes (one layout everywhere):
    q_pos    [Tq]  int64         index of each query in its (global, unsharded) row
    k_pos    [Tk]  int64         index of each key in its row
    q_doc    [B, Tq] int64       document id of each query (packed sequences)
    k_doc    [B, Tk] int64       document id of each key

A query at position i may see a key at position j iff they share a document, and
``j <= i`` when causal, and ``i - j < window`` (``|i - j| < window`` when not causal)
when a sliding window is set. Because positions are explicit, a Q chunk can meet a K
chunk from anywhere in the sequence (ring steps, zigzag halves, all-gathered K/V).

Span plan (per batch row, ``span_plan``): queries and keys split into runs of consecutive
positions inside one document; each same-document (query run, key run) pair becomes at most
two pieces, so packed documents compute only their own blocks:
    "full"    every pair allowed (keys wholly before the queries, or not causal)
    "causal"  the diagonal part, key j <= query i, both sides starting at the same position
    "band"    anything a sliding window cuts: a tile loop over ``block`` queries whose keys
              are clipped to the band and masked only in tiles the band cuts
Positions that break into very many runs (more than ``MAX_PIECES`` pairs) use the generic
fixed-block plan (``active_blocks``).

Tile plan (``tile_plan``, masks with a per-head block pattern, S2): queries and keys split into
tiles of at most ``pattern.block`` consecutive positions inside one pattern block and one
document of every row (``Tiles``); per group of KV heads with the same layout, each query tile
against only the key tiles the pattern and the mask leave non-empty, exactly
(``planned_pairs`` counts the work).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.ops.common import run_starts

DEFAULT_BLOCK = 256
MAX_PIECES = 4096  # more (query run, key run) pairs than this: use the generic block plan


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

    def pattern_allowed(self, qs: slice, kidx: torch.Tensor, head: int, b: int = 0) -> torch.Tensor:
        """bool [tq, tk]: the block pattern of global KV head ``head`` at token level, row b
        (a per-document pattern's blocks depend on the row's documents)."""
        row = torch.tensor([b])
        qb = self.pattern.blocks(self.q_pos[qs], self.q_doc[b : b + 1, qs], row)[0]
        kb = self.pattern.blocks(self.k_pos[kidx], self.k_doc[b : b + 1, kidx], row)[0]
        return self.pattern.active(qb[:, None], kb[None, :], head)

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


@dataclass(frozen=True)
class Tiles:
    """Tiles of a run of entries (queries or keys) for a mask with a block pattern: each tile
    is consecutive entries at consecutive positions inside one pattern block and one document
    of every batch row, and inside one row block of ``size`` tokens (so at most ``size``
    entries). Its bounds are then exact, and a (query tile, key tile) pair is wholly in or out
    of the pattern and of the document mask; only causality and a window cut tokens inside.

    start, stop [n]  entry ranges        lo, hi [n]  first / last position
    doc [B, n]       document per row    blk [R, n]  pattern block per row (R = 1 or B)
    """

    start: torch.Tensor
    stop: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    doc: torch.Tensor
    blk: torch.Tensor

    def __len__(self) -> int:
        return self.start.shape[0]

    def index(self, sel: torch.Tensor) -> torch.Tensor:
        """Entry indices [m] of tiles ``sel`` (1-D tile ids), tile after tile."""
        start, n = self.start[sel], (self.stop - self.start)[sel]
        if n.numel() == 0:
            return start
        base = torch.repeat_interleave(start - torch.cumsum(n, 0) + n, n)
        return base + torch.arange(int(n.sum()), device=base.device)


def split_tiles(pos: torch.Tensor, doc: torch.Tensor, blk: torch.Tensor, size: int) -> Tiles:
    """Tiles of entries at positions pos [T] with documents doc [B, T] and pattern blocks
    blk [R, T]: a new tile wherever a run of positions, a row block of ``size``, a document or a
    pattern block of any row changes."""
    t = pos.shape[0]
    cut = torch.ones(t, dtype=torch.bool, device=pos.device)
    cut[1:] = (
        (pos[1:] != pos[:-1] + 1)
        | (pos[1:] // size != pos[:-1] // size)
        | (doc[:, 1:] != doc[:, :-1]).any(0).to(pos.device)
        | (blk[:, 1:] != blk[:, :-1]).any(0).to(pos.device)
    )
    start = cut.nonzero().flatten()
    stop = torch.cat([start[1:], start.new_tensor([t])])
    return Tiles(start, stop, pos[start], pos[stop - 1], doc[:, start.to(doc.device)], blk[:, start.to(blk.device)])


def token_blocks(mask: MaskSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [R, Tq], k [R, Tk]): the pattern block of every query and key (R = 1 for row blocks,
    B for per-document blocks, which depend on each row's documents)."""
    return mask.pattern.blocks(mask.q_pos, mask.q_doc), mask.pattern.blocks(mask.k_pos, mask.k_doc)


def pattern_tiles(mask: MaskSpec) -> tuple[Tiles, Tiles]:
    """(query tiles, key tiles) of a mask with a block pattern (``Tiles``, size pattern.block)."""
    qb, kb = token_blocks(mask)
    size = mask.pattern.block
    return split_tiles(mask.q_pos, mask.q_doc, qb, size), split_tiles(mask.k_pos, mask.k_doc, kb, size)


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


def _tile_pairs(mask: MaskSpec, qt: Tiles, kt: Tiles) -> torch.Tensor:
    """[B, nq, nk] bool: (query tile, key tile) pairs of row b holding an allowed pair under
    the token mask (documents, causality, window); exact, tiles having one document per row."""
    ok = qt.doc[:, :, None] == kt.doc[:, None, :]
    lo_q, hi_q, lo_k, hi_k = qt.lo[:, None], qt.hi[:, None], kt.lo[None, :], kt.hi[None, :]
    if mask.causal:
        ok = ok & (lo_k <= hi_q).to(ok.device)
    if mask.window is not None:
        ok = ok & (lo_q - hi_k < mask.window).to(ok.device)
        if not mask.causal:
            ok = ok & (lo_k - hi_q < mask.window).to(ok.device)
    return ok


def tile_candidates(mask: MaskSpec, block: int, n_kv: int):
    """(groups, ok): ``groups`` = head_groups; ``ok`` [B, G, nq, nk] bool, may query tile i and
    key tile j of row b hold an allowed pair for the heads of group g. With a pattern the tiles
    are ``pattern_tiles`` (exact: a candidate holds an allowed pair); without, ``block``
    consecutive entries (conservative)."""
    groups = head_groups(mask, n_kv)
    if mask.pattern is None:
        return groups, block_candidates(mask, block, block)[:, None]
    qt, kt = pattern_tiles(mask)
    ok = _tile_pairs(mask, qt, kt)
    qb, kb = qt.blk[:, :, None], kt.blk[:, None, :]
    per_group = [mask.pattern.active(qb, kb, head).to(ok.device) for _, head in groups]  # [R, nq, nk]
    return groups, ok[:, None] & torch.stack(per_group, 1)


def tile_plan(mask: MaskSpec, n_kv: int):
    """(groups, q tiles, k tiles, plan) for a mask with a block pattern: ``plan[b][g]`` = list of
    (query tile id, key tile ids whose pairs are all allowed, key tile ids the token mask cuts:
    causality on the diagonal or a window edge) for row b and head group g, query tiles
    without keys left out."""
    groups, ok = tile_candidates(mask, 0, n_kv)
    qt, kt = pattern_tiles(mask)
    cut = torch.zeros(len(qt), len(kt), dtype=torch.bool)
    if mask.causal:
        cut |= kt.hi[None, :] > qt.lo[:, None]
    if mask.window is not None:
        cut |= qt.hi[:, None] - kt.lo[None, :] >= mask.window
        if not mask.causal:
            cut |= kt.hi[None, :] - qt.lo[:, None] >= mask.window
    plan = []
    for okb in ok.cpu():
        per_group = []
        for okg in okb:
            iq, ik = okg.nonzero().unbind(1)  # candidate pairs, by query tile then key tile
            part = cut[iq, ik]
            counts = torch.bincount(iq, minlength=len(qt)).tolist()
            rows = enumerate(zip(ik.split(counts), part.split(counts)))
            per_group.append([(q, ks[~p], ks[p]) for q, (ks, p) in rows if ks.numel()])
        plan.append(per_group)
    return groups, qt, kt, plan


def _pattern_pairs(mask: MaskSpec, n_heads: int, n_kv: int) -> int:
    """(query head, query, key) score entries the kernel computes for this mask: its FLOPs are
    4 * D times this in forward (scores and values), twice that in backward."""
    groups, qt, kt, plan = tile_plan(mask, n_kv)
    per_kv = n_heads // n_kv
    q_len, k_len = (qt.stop - qt.start).tolist(), (kt.stop - kt.start)
    total = 0
    for rows in plan:
        for (hs, _), tiles in zip(groups, rows):
            for iq, full, part in tiles:
                keys = int(k_len[full].sum() + k_len[part].sum())
                total += q_len[iq] * keys * (hs.stop - hs.start) * per_kv
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


# ----------------------------------------------------------------------------- span plan
@dataclass(frozen=True)
class Piece:
    """One rectangle of a row's plan: queries ``qs`` against keys ``ks`` (slices of the
    tensor index), inside one document, where both sides are runs of consecutive positions
    starting at ``q0`` / ``k0``. form:
        "full"    every pair is allowed
        "causal"  key j allowed iff j <= i, with q0 == k0 (a diagonal square or a taller
                  rectangle: top-left aligned, every query sees at least one key)
        "band"    the mask's causal / window rule, evaluated per tile from positions
    """

    qs: slice
    ks: slice
    q0: int
    k0: int
    form: str


def _runs(pos: torch.Tensor, doc: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """Maximal runs of consecutive positions inside one document: (start, length, first
    position, doc id) for pos [T], doc [T]."""
    t = pos.shape[0]
    if t == 0:
        return []
    starts = run_starts(pos, doc)
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
            total += tq * (tk + 1) // 2 if p.form == "causal" and tq == tk else tq * tk
    return total


def patterned(mask: MaskSpec) -> bool:
    """A per-head block pattern that leaves some block inactive (an all-dense one is the
    plain mask)."""
    return mask.pattern is not None and not getattr(mask.pattern, "all_dense", False)


def planned_pairs(mask: MaskSpec, block: int = DEFAULT_BLOCK, n_heads: int = 1, n_kv: int = 1) -> int:
    """(query head, query, key) score entries the kernel computes for ``mask`` (all rows): its
    FLOPs are 4 * D times this in forward (scores and values), twice that in backward. Without
    a pattern the span plan computes exactly the allowed pairs (per head); with an S2 pattern,
    every active tile pair whole."""
    if patterned(mask):
        return _pattern_pairs(mask, n_heads, n_kv)
    return _span_pairs(mask, block) * n_heads
