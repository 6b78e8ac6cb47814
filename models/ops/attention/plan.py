"""Which (query, key) pairs softmax attention computes: the mask, and the plans the kernel runs.

Shapes (one layout everywhere):
    q_pos    [Tq]  int64         index of each query in its (global, unsharded) row
    k_pos    [Tk]  int64         index of each key in its row
    q_doc    [B, Tq] int64       document id of each query (packed sequences)
    k_doc    [B, Tk] int64       document id of each key

The mask is a set of slices over the global row (slices.py: rectangles of row positions cut
by at most two diagonals, MagiAttention's full / causal / inv_causal / bi_causal, optionally
per head). A ``MaskSpec`` is the view of one (Q chunk, K chunk) pair: explicit positions on
both sides (so a Q chunk can meet a K chunk from anywhere in the sequence: ring steps, zigzag
halves, all-gathered K/V) and either a global ``SliceMask`` (``slices``, any builder) or the
packed-documents builder's compact inputs: a query at position i may see a key at position j
iff they share a document, and ``j <= i`` when causal, and ``i - j < window`` (``|i - j| <
window`` when not causal) when a sliding window is set; ``row_slices`` turns those into the
slices of the chunk pair (one per same-document pair of runs), so the kernel sees slices only.

Span plan (per batch row, ``span_plan``): every slice is cut by the runs of consecutive
positions of the queries and of the keys; each non-empty cut, shrunk to the rows and columns
that hold an allowed pair (``Slice.clip``), becomes at most two pieces:
    "full"    every pair allowed
    "causal"  top-left aligned diagonal: key k allowed iff k - k0 <= q - q0 (the fused op's)
    "band"    anything else (windows, inv_causal, bi_causal): a tile loop over ``block``
              queries whose keys are clipped to the band and masked only in tiles it cuts
so the work is the slices' area (plus at most one block-wide triangle per band tile). A band at
least 2 ``BAND_TILE_MIN`` wide is cut per query tile (``split_band``) into a full and a causal piece
for the fused op and one masked triangle.
Positions that break into very many runs (more than ``MAX_PIECES`` pieces) use the generic
fixed-block plan (``active_blocks``).

Tile plan (``tile_plan``, masks with a per-head block pattern, S2): queries and keys split into
tiles of at most ``pattern.block`` consecutive positions inside one pattern block and one
document of every row (``Tiles``); per group of KV heads with the same layout, each query tile
against only the key tiles the pattern and the mask leave non-empty, exactly
(``planned_pairs`` counts the work).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from models.ops.attention.slices import Slice, SliceMask, pairs
from models.ops.common import run_starts

DEFAULT_BLOCK = 256
MAX_PIECES = 4096  # more (query run, key run) pairs than this: use the generic block plan


@dataclass(frozen=True)
class MaskSpec:
    """Index metadata for one (Q chunk, K chunk) pair; see the module docstring.
    ``slices``: the global mask (a ``SliceMask``); None: packed documents (q_doc, k_doc,
    causal, window). ``pattern``: optional per-KV-head block pattern (S2Pattern, BlockLayout);
    ``kv_heads``: the global KV head of each local one (None: local = global, 0..Hkv-1);
    ``q_heads``: the global query head of each local one (head-sharded strategies; None:
    local = global), for slices restricted to some heads."""

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    q_doc: torch.Tensor | None = None
    k_doc: torch.Tensor | None = None
    causal: bool = True
    window: int | None = None
    pattern: object | None = None
    kv_heads: tuple[int, ...] | None = None
    slices: SliceMask | None = None
    q_heads: tuple[int, ...] | None = None

    def global_head(self, local: int) -> int:
        return local if self.kv_heads is None else self.kv_heads[local]

    def pattern_allowed(self, qs: slice, kidx: torch.Tensor, head: int, b: int = 0) -> torch.Tensor:
        """bool [tq, tk]: the block pattern of global KV head ``head`` at token level, row b
        (a per-document pattern's blocks depend on the row's documents)."""
        row = torch.tensor([b])
        qb = self.pattern.blocks(self.q_pos[qs], self.q_doc[b : b + 1, qs], row)[0]
        kb = self.pattern.blocks(self.k_pos[kidx], self.k_doc[b : b + 1, kidx], row)[0]
        return self.pattern.active(qb[:, None], kb[None, :], head)

    def row_slices(self, b: int) -> tuple[Slice, ...]:
        """The slices of batch row b that this chunk pair may meet (the documents builder's,
        cut to the same-document pairs of runs, when the mask is given by documents)."""
        if self.slices is not None:
            return self.slices.row(b)
        return doc_slices(self.q_pos, self.k_pos, self.q_doc[b], self.k_doc[b], self.causal, self.window)

    def head_slices(self) -> bool:
        """Whether some slice applies to only some heads."""
        return self.slices is not None and any(s.heads is not None for row in self.slices.rows for s in row)

    def local_heads(self, heads: tuple[int, ...] | None, n_heads: int) -> tuple[int, ...] | None:
        """Local query heads (of ``n_heads``) a slice restricted to global ``heads`` applies to;
        None: all of them."""
        if heads is None:
            return None
        glob = range(n_heads) if self.q_heads is None else self.q_heads
        local = tuple(i for i, g in enumerate(glob) if g in heads)
        return None if len(local) == n_heads else local

    def allowed(self, qs: slice, kidx: torch.Tensor, b: int, n_heads: int | None = None) -> torch.Tensor:
        """Boolean mask [tq, tk] for queries ``qs`` and key indices ``kidx`` of row b ([H, tq, tk]
        with ``n_heads`` when some slice applies to only some heads)."""
        qp = self.q_pos[qs][:, None]
        kp = self.k_pos[kidx][None, :]
        if self.slices is None:
            m = self.q_doc[b, qs][:, None] == self.k_doc[b, kidx][None, :]
            if self.causal:
                m = m & (kp <= qp)
            if self.window is not None:
                diff = qp - kp if self.causal else (qp - kp).abs()
                m = m & (diff < self.window)
            return m
        per_head = self.head_slices()
        if per_head and n_heads is None:
            raise ValueError("this mask has slices for some heads only: pass n_heads")
        m = torch.zeros(*((n_heads,) if per_head else ()), qp.shape[0], kp.shape[1], dtype=torch.bool)
        for s in self.slices.row(b):
            a = s.allowed(qp[:, 0], kp[0])
            if not per_head:
                m |= a
                continue
            heads = self.local_heads(s.heads, n_heads)
            if heads is None:
                m |= a
            elif heads:
                m[list(heads)] |= a
        return m


def doc_slices(q_pos, k_pos, q_doc, k_doc, causal: bool, window: int | None) -> tuple[Slice, ...]:
    """The packed-documents builder on one chunk pair: one slice per (query run, key run) of the
    same document (runs of consecutive positions, q_doc / k_doc [T] of one row), bounded by the
    causal (k - q <= 0) and window (k - q > -window; < window when not causal) diagonals."""
    lo = None if window is None else -(window - 1)
    hi = 0 if causal else (None if window is None else window - 1)
    by_doc: dict[int, list] = {}
    for _, kl, kp, kd in _runs(k_pos, k_doc):
        by_doc.setdefault(kd, []).append((kp, kl))
    q_runs = _runs(q_pos, q_doc)
    return tuple(Slice(qp, qp + ql, kp, kp + kl, lo, hi) for _, ql, qp, qd in q_runs for kp, kl in by_doc.get(qd, ()))


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


def check_mask(mask, q: torch.Tensor, batch: int, seq_len: int, causal: bool = True, window: int | None = None):
    """A ``SliceMask`` given to softmax attention (``model.mask``) fits the batch: its rows, row
    length and heads, no overlapping slices, and no causal / window setting beside it (the slices
    say both). Checked once per mask object (before any collective)."""
    if not isinstance(mask, SliceMask):
        raise ValueError(f"mask must be a SliceMask (models/ops/attention/slices.py), got {type(mask).__name__}")
    if window is not None:
        raise ValueError(
            f"model.sliding_window={window} cannot be combined with model.mask={mask.name}: "
            "build the window into the mask (mask builder sliding_window or global_sliding_window)"
        )
    if not causal:
        raise ValueError(f"causal=False beside model.mask={mask.name}: the mask's slices decide what is causal")
    if mask.seq_len != seq_len:
        raise ValueError(
            f"model.mask={mask.name} covers rows of {mask.seq_len} tokens but the batch rows hold {seq_len} "
            "(data.seq_len): build the mask for the batch's row length"
        )
    key = (batch, q.shape[2])
    if getattr(mask, "_checked", None) != key:
        mask.check(batch, q.shape[2])
        object.__setattr__(mask, "_checked", key)  # frozen: a cache, not part of the value


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
    A conservative test on per-block position and document bounds (never a false 'no'); with
    a ``SliceMask``, on the slices the block bounds meet."""
    qlo, qhi = _block_bounds(mask.q_pos, block_q)  # [nq]
    klo, khi = _block_bounds(mask.k_pos, block_k)  # [nk]
    if mask.slices is not None:
        return torch.stack([_slice_candidates(mask.slices.row(b), qlo, qhi, klo, khi) for b in range(_rows(mask))])
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


def _rows(mask: MaskSpec) -> int:
    """Batch rows the mask describes (a shared SliceMask row counts as one)."""
    return mask.q_doc.shape[0] if mask.q_doc is not None else len(mask.slices.rows)


def _slice_candidates(row, qlo, qhi, klo, khi) -> torch.Tensor:
    """[nq, nk] bool: some slice of ``row`` may hold a pair of query block i (positions within
    [qlo, qhi]) and key block j ([klo, khi])."""
    ok = torch.zeros(qlo.shape[0], klo.shape[0], dtype=torch.bool)
    for s in row:
        qa, qb = qlo.clamp(min=s.q0)[:, None], qhi.clamp(max=s.q1 - 1)[:, None]
        ka, kb = klo.clamp(min=s.k0)[None, :], khi.clamp(max=s.k1 - 1)[None, :]
        m = (qa <= qb) & (ka <= kb)
        if s.lo is not None:
            m &= kb - qa >= s.lo
        if s.hi is not None:
            m &= ka - qb <= s.hi
        ok |= m
    return ok


def may_attend(mask: MaskSpec, block: int, n_kv: int = 1) -> bool:
    """False only if no (query, key) pair of the whole (Q, K) pair is allowed (for any of the
    ``n_kv`` local KV heads when the mask has a per-head pattern). Exact for masks without a
    pattern whose span plan exists (a slice that touches the pair gives a non-empty piece)."""
    if mask.pattern is not None:
        return bool(tile_candidates(mask, block, n_kv)[1].any())
    for b in range(_rows(mask)):
        plan = span_plan(mask, b, split=False)
        if plan is None:
            return bool(block_candidates(mask, block, block).any())
        if plan:
            return True
    return False


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
    tensor index), both runs of consecutive positions starting at ``q0`` / ``k0``, where key
    position k is allowed for query position q iff ``lo <= k - q <= hi`` (None: unbounded), for
    local query heads ``heads`` (None: all). form:
        "full"    every pair is allowed
        "causal"  key k allowed iff k - k0 <= q - q0 (hi = k0 - q0, no lo): top-left aligned,
                  a diagonal square or a taller rectangle, every query sees at least one key
        "band"    anything else, evaluated per tile from positions
    """

    qs: slice
    ks: slice
    q0: int
    k0: int
    form: str
    lo: int | None = None
    hi: int | None = None
    heads: tuple[int, ...] | None = None

    def area(self) -> int:
        """Allowed (query, key) pairs of the piece (per head)."""
        return pairs(
            self.q0,
            self.q0 + self.qs.stop - self.qs.start,
            self.k0,
            self.k0 + self.ks.stop - self.ks.start,
            self.lo,
            self.hi,
        )


def _runs(pos: torch.Tensor, doc: torch.Tensor | None = None) -> list[tuple[int, int, int, int]]:
    """Maximal runs of consecutive positions (inside one document when ``doc`` [T] is given):
    (start, length, first position, doc id or 0) for pos [T]."""
    t = pos.shape[0]
    if t == 0:
        return []
    starts = run_starts(pos, doc)
    lengths = torch.diff(starts, append=starts.new_tensor([t]))
    docs = doc[starts].tolist() if doc is not None else [0] * len(starts)
    return list(zip(starts.tolist(), lengths.tolist(), pos[starts].tolist(), docs))


def _meeting(runs, lo: int, hi: int, firsts: list[int]):
    """The runs (sorted by first position, ``firsts``) that meet positions [lo, hi)."""
    i = max(0, bisect.bisect_right(firsts, lo) - 1)
    while i < len(runs) and runs[i][2] < hi:
        if runs[i][2] + runs[i][1] > lo:
            yield runs[i]
        i += 1


def _cut_pieces(t: Slice, qr, kr, heads) -> list[Piece]:
    """Pieces of slice ``t`` (already clipped to the query run ``qr`` x key run ``kr``, tight)."""
    qs = slice(qr[0] + t.q0 - qr[2], qr[0] + t.q1 - qr[2])
    ks = slice(kr[0] + t.k0 - kr[2], kr[0] + t.k1 - kr[2])
    lo_cuts = t.lo is not None and t.k0 - (t.q1 - 1) < t.lo
    hi_cuts = t.hi is not None and t.k1 - 1 - t.q0 > t.hi
    if lo_cuts:
        return [Piece(qs, ks, t.q0, t.k0, "band", t.lo, t.hi, heads)]
    if not hi_cuts and not (t.hi is not None and t.hi == t.k0 - t.q0):  # (a 1 x 1 diagonal stays causal)
        return [Piece(qs, ks, t.q0, t.k0, "full", None, None, heads)]
    a = t.q0 + t.hi  # first key position on the diagonal of the first query (>= k0: tight)
    diag = Piece(slice(qs.start, qs.stop), slice(ks.start + a - t.k0, ks.stop), t.q0, a, "causal", None, t.hi, heads)
    if a == t.k0:
        return [diag]
    return [Piece(qs, slice(ks.start, ks.start + a - t.k0), t.q0, t.k0, "full", None, None, heads), diag]


def span_plan(mask: MaskSpec, b: int, n_heads: int | None = None, split: bool = True) -> list[Piece] | None:
    """The pieces that cover every allowed pair of batch row b exactly once, or None when the
    positions break into so many runs that the generic block plan is cheaper. ``n_heads``:
    local query heads (needed when slices apply to some heads only; None keeps every slice,
    with its global heads, which is enough to tell whether a pair of chunks meets). ``split``:
    wide bands cut into fused pieces per query tile (``split_band``; False: one band piece)."""
    pieces: list[Piece] = []
    for s, qr, kr in _slice_runs(mask, b):
        heads = s.heads if n_heads is None else mask.local_heads(s.heads, n_heads)
        if heads == ():
            continue
        t = s.clip(qr[2], qr[2] + qr[1], kr[2], kr[2] + kr[1])
        if t is not None:
            pieces += _cut_pieces(t, qr, kr, heads)
        if len(pieces) > MAX_PIECES:
            return None
    return [x for p in pieces for x in split_band(p)] if split else pieces


BAND_TILE_MIN, BAND_TILE_MAX = 128, 256  # a split band's query tile: <= half the band, in these bounds


def split_band(p: Piece) -> list[Piece]:
    """A band piece whose band (keys q + lo .. q + hi of query q) is at least 2 ``BAND_TILE_MIN``
    wide, as pieces per query tile of B rows [a, a + B): the keys every row of the tile sees
    ([a + B + lo, a + hi]) as one "full" piece and the upper edge as a "causal" one (both for the
    fused op), leaving only the lower edge's B x B triangle as a (tiled, masked) band piece.
    Tiles whose band the piece's key range clips, and narrow bands, stay band pieces."""
    if p.form != "band" or p.lo is None:
        return [p]
    width = None if p.hi is None else p.hi - p.lo  # the band holds width + 1 keys
    # (narrower: the fused calls per tile cost more than the tile loop's masked work, measured on CPU)
    tile = BAND_TILE_MAX if width is None else min(BAND_TILE_MAX, 1 << max(0, (width // 2).bit_length() - 1))
    if tile < BAND_TILE_MIN:
        return [p]
    nq, nk = p.qs.stop - p.qs.start, p.ks.stop - p.ks.start
    k_end = p.k0 + nk

    def piece(q_first, q_last, k_first, k_last, form, lo=None, hi=None):  # positions, ends exclusive
        qs = slice(p.qs.start + q_first - p.q0, p.qs.start + q_last - p.q0)
        ks = slice(p.ks.start + k_first - p.k0, p.ks.start + k_last - p.k0)
        return Piece(qs, ks, q_first, k_first, form, lo, hi, p.heads)

    out = []
    for a in range(p.q0, p.q0 + nq, tile):
        b = min(p.q0 + nq, a + tile)
        top = k_end if p.hi is None else b + p.hi  # the tile's band: keys [a + lo, top)
        if a + p.lo < p.k0 or top > k_end:  # clipped by the key range: one band piece
            first, last = max(p.k0, a + p.lo), min(k_end, top)
            if first < last:
                out.append(piece(a, b, first, last, "band", p.lo, p.hi))
            continue
        out.append(piece(a, b, a + p.lo, b + p.lo, "band", p.lo, None))  # lower edge: k >= q + lo
        full_end = k_end if p.hi is None else a + p.hi + 1
        if full_end > b + p.lo:
            out.append(piece(a, b, b + p.lo, full_end, "full"))
        if p.hi is not None and b - a > 1:  # upper edge: rows a+1.. see keys a+hi+1 .. q+hi
            out.append(piece(a + 1, b, a + p.hi + 1, b + p.hi, "causal", None, p.hi))
    return out


def _slice_runs(mask: MaskSpec, b: int):
    """(slice, query run, key run) for every run pair a slice of row b meets. A SliceMask's
    positions are unique in a row (runs sorted by position never overlap); the documents
    builder's slices are tied to their own same-document run pair (positions may repeat across
    documents, e.g. CAD's calls over several batch rows)."""
    if mask.slices is None:
        lo = None if mask.window is None else -(mask.window - 1)
        hi = 0 if mask.causal else (None if mask.window is None else mask.window - 1)
        by_doc: dict[int, list] = {}
        for kr in _runs(mask.k_pos, mask.k_doc[b]):
            by_doc.setdefault(kr[3], []).append(kr)
        for qr in _runs(mask.q_pos, mask.q_doc[b]):
            for kr in by_doc.get(qr[3], ()):
                yield Slice(qr[2], qr[2] + qr[1], kr[2], kr[2] + kr[1], lo, hi), qr, kr
        return
    qruns = sorted(_runs(mask.q_pos), key=lambda r: r[2])
    kruns = sorted(_runs(mask.k_pos), key=lambda r: r[2])
    qfirst, kfirst = [r[2] for r in qruns], [r[2] for r in kruns]
    for s in mask.slices.row(b):
        for qr in _meeting(qruns, s.q0, s.q1, qfirst):
            for kr in _meeting(kruns, s.k0, s.k1, kfirst):
                yield s, qr, kr


def band_tiles(p: Piece, block: int):
    """Tiles of a piece for the tile loop: (query slice, key slice, allowed [tq, tk] or None),
    slices relative to the piece. Keys are clipped to each tile's band; masks only where cut."""
    tq, tk = p.qs.stop - p.qs.start, p.ks.stop - p.ks.start
    for t0 in range(0, tq, block):
        t1 = min(tq, t0 + block)
        if p.form == "full":
            yield slice(t0, t1), slice(0, tk), None
            continue
        lo_i, hi_i = p.q0 + t0, p.q0 + t1 - 1  # the tile's query positions
        lo = p.k0 if p.lo is None else max(p.k0, lo_i + p.lo)
        hi = p.k0 + tk - 1 if p.hi is None else min(p.k0 + tk - 1, hi_i + p.hi)
        if lo > hi:
            continue
        cut = (p.lo is not None and lo - hi_i < p.lo) or (p.hi is not None and hi - lo_i > p.hi)
        allowed = None
        if cut:
            d = torch.arange(lo, hi + 1)[None, :] - torch.arange(lo_i, hi_i + 1)[:, None]
            allowed = torch.ones(d.shape, dtype=torch.bool)
            if p.lo is not None:
                allowed &= d >= p.lo
            if p.hi is not None:
                allowed &= d <= p.hi
        yield slice(t0, t1), slice(lo - p.k0, hi - p.k0 + 1), allowed


def piece_work(p: Piece, block: int) -> int:
    """(query, key) score entries the kernel computes for a piece (per head): the area of full
    and causal pieces (the fused op skips the blocks above its diagonal), the tiles of a band."""
    if p.form != "band":
        return p.area()
    return sum((rs.stop - rs.start) * (ks.stop - ks.start) for rs, ks, _ in band_tiles(p, block))


def _span_pairs(mask: MaskSpec, block: int = DEFAULT_BLOCK, n_heads: int = 1) -> int:
    """(query head, query, key) entries the kernel computes for an unpatterned ``mask`` (all rows)."""
    total = 0
    for b in range(_rows(mask)):
        plan = span_plan(mask, b, n_heads if mask.head_slices() else None)
        if plan is None:
            total += sum(len(kidx) * block for kidx in active_blocks(mask, block, block)[b]) * n_heads
            continue
        for p in plan:
            total += piece_work(p, block) * (n_heads if p.heads is None else len(p.heads))
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
    return _span_pairs(mask, block, n_heads)
