"""Core attention disaggregation (CAD): the planner. Pure and deterministic, no communication:
every rank computes the same plan from ``cu_seqlens``, the world size, the layout and a few
options (parallel/strategies/cad.py runs it).

Terms (P ranks, a [B, N] batch of packed documents, row positions 0..N-1):
    segment   a document cut at row boundaries: (row b, start, end) in row positions
    shard     a query range [lo, hi) of one segment, computed on one rank, together with the
              key range [klo, khi) its queries need (the causal prefix, the window, the whole
              document when not causal): each query token belongs to exactly one shard, so a
              shard's output needs no merge with other pieces
    cost      allowed (query, key) pairs of a shard; its forward FLOPs are 4 * cost * H * D

With a ``SliceMask`` (any mask family, models/ops/attention/slices.py) segments are the row cut
at every slice's query bounds, a shard's cost is the area of the slices over its queries (per
head: a slice of some heads counts for those), never their bounding box, and its key range
is the smallest range holding every key those slices allow (the K/V it receives: keys inside
that range that no slice uses travel too, e.g. the middle blocks of causal_blockwise).
    home      the rank holding a token under the layout (parallel/sharding.py)

Algorithm (greedy, after DistCA): start from the layout's own placement, each shard a run of
one segment on one rank. While the most loaded rank s exceeds ``tolerance`` x mean, move work
from s to the least loaded rank d: among s's shards take the one that moves the fewest bytes
per pair (Q out, O back and the K/V not already on d), cut to at most the amount
min(load[s] - mean, mean - load[d]) when it is larger (pieces of at least ``min_shard``
tokens, the head or the tail of the shard, whichever moves fewer bytes per pair). It stops
when balanced, or when s has nothing that lowers the maximum. So a placement that is already
balanced moves no query. ``nanos=2`` splits each rank's shards into two nano-batches of
nearly equal cost (ping-pong).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from parallel.sharding import rank_runs


@dataclass(frozen=True)
class Shard:
    """Queries [lo, hi) of segment ``seg`` (row ``row``, positions [start, end)), needing keys
    [klo, khi); computed on rank ``rank`` in nano-batch ``nano``; ``cost`` pairs."""

    seg: int
    row: int
    lo: int
    hi: int
    klo: int
    khi: int
    cost: int
    rank: int
    nano: int = 0


def owner_runs(seq_len: int, world: int, layout: str) -> list[list[tuple[int, int]]]:
    """runs[r]: the row-position ranges [a, b) rank r holds, in its local order (the layout's,
    parallel/sharding.py; one world holds the whole row as one range, whatever the layout)."""
    if world == 1:
        return [[(0, seq_len)]]
    return rank_runs(seq_len, world, layout)


def key_range(lo: int, hi: int, start: int, end: int, causal: bool, window: int | None) -> tuple[int, int]:
    """Keys [klo, khi) that queries [lo, hi) of a document [start, end) may see."""
    klo = start if window is None else max(start, lo - window + 1)
    if causal:
        return klo, hi
    return klo, end if window is None else min(end, hi - 1 + window)


def pair_count(lo: int, hi: int, start: int, end: int, causal: bool, window: int | None) -> int:
    """Allowed (query, key) pairs of queries [lo, hi) in a document [start, end)."""
    a, b = lo - start, hi - start  # document-relative query rows
    if causal:  # row i sees min(i + 1, window) keys
        w = b if window is None else window
        m = min(max(w, a), b)
        return (m - a) * (a + m + 1) // 2 + (b - m) * w
    if window is None:
        return (b - a) * (end - start)
    i = torch.arange(a, b)
    return int((torch.clamp(i + window, max=end - start) - torch.clamp(i - window + 1, min=0)).sum())


@dataclass
class CADPlan:
    """The plan: every shard with its rank and nano-batch, loads before (``home_load``) and
    after (``load``), in allowed pairs. Row positions of a [B, N] batch; flat index = b*N + p."""

    world: int
    batch: int
    seq_len: int
    layout: str
    causal: bool
    window: int | None
    shards: list[Shard]
    home_load: list[int]
    load: list[int]
    seg_starts: torch.Tensor = field(repr=False)  # [n_seg] flat starts of the segments
    mask: object | None = field(default=None, repr=False)  # the SliceMask planned for, or None (documents)
    _by_rank_cache: list | None = field(default=None, init=False, repr=False, compare=False)
    _received: list | None = field(default=None, init=False, repr=False, compare=False)

    def balance(self) -> float:
        """max / mean attention load (pairs) over ranks after planning; 1.0 when idle."""
        return _ratio(self.load)

    def home_balance(self) -> float:
        """max / mean load of the layout's own placement (ring / all-gather compute there)."""
        return _ratio(self.home_load)

    def owner(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(owner [N], local position [N]) of every row position under the layout."""
        own, loc = torch.empty(self.seq_len, dtype=torch.int64), torch.empty(self.seq_len, dtype=torch.int64)
        for r, runs in enumerate(owner_runs(self.seq_len, self.world, self.layout)):
            off = 0
            for a, b in runs:
                own[a:b], loc[a:b] = r, torch.arange(off, off + b - a)
                off += b - a
        return own, loc

    def rows(self, rank: int, nano: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(query flat indices [Tq], key flat indices [Tk]) computed / held on ``rank`` for
        attention (in nano-batch ``nano``; None: both), each sorted and unique."""
        q, kv = self.spans(rank, nano)
        return _indices(q), _indices(kv)

    def spans(self, rank: int, nano: int | None = None) -> tuple[list, list]:
        """The same as merged flat ranges [(a, b)]: (queries, keys)."""
        n = self.seq_len
        mine = [s for s in self._by_rank()[rank] if nano is None or s.nano == nano]
        q = _merge([(s.row * n + s.lo, s.row * n + s.hi) for s in mine])
        kv = _merge([(s.row * n + s.klo, s.row * n + s.khi) for s in mine])
        return q, kv

    def _by_rank(self) -> list[list[Shard]]:
        if self._by_rank_cache is None:
            self._by_rank_cache = [[] for _ in range(self.world)]
            for s in self.shards:
                self._by_rank_cache[s.rank].append(s)
        return self._by_rank_cache

    def doc_of(self, flat: torch.Tensor) -> torch.Tensor:
        """Segment id of flat indices (documents cut at row boundaries)."""
        return torch.searchsorted(self.seg_starts, flat, right=True) - 1

    def received_rows(self, rank: int) -> tuple[int, int, int]:
        """(query rows, key/value rows, output rows) ``rank`` receives in one forward (each
        nano-batch receives its own keys)."""
        if self._received is None:
            self._received = self._count_received()
        return self._received[rank]

    def _count_received(self) -> list[tuple[int, int, int]]:
        grid = _Grid(self.seq_len, self.world, self.layout)
        n, out = self.seq_len, []
        o_in = [0] * self.world
        for s in self.shards:  # O of a shard goes back to the owners of its queries
            for r, cnt in grid.owners(s.lo, s.hi).items():
                if r != s.rank:
                    o_in[r] += cnt
        for r in range(self.world):
            q_in = kv_in = 0
            for nano in (0, 1):
                q, kv = self.spans(r, nano)
                q_in += sum(b - a - grid.owners(a, b).get(r, 0) for a, b in _in_rows(q, n))
                kv_in += sum(b - a - grid.owners(a, b).get(r, 0) for a, b in _in_rows(kv, n))
            out.append((q_in, kv_in, o_in[r]))
        return out

    def bytes_received(self, rank: int, n_heads: int, n_kv_heads: int, head_dim: int, elem_bytes: int) -> int:
        """Bytes ``rank`` receives in one layer's forward: Q and K/V dispatched to it, O of its
        own queries computed elsewhere (exactly what parallel/strategies/cad.py sends)."""
        q_in, kv_in, o_in = self.received_rows(rank)
        return ((q_in + o_in) * n_heads + kv_in * 2 * n_kv_heads) * head_dim * elem_bytes

    def memory(self, rank: int, n_heads: int, n_kv_heads: int, head_dim: int, elem_bytes: int) -> int:
        """Bytes held for attention on ``rank``: Q and O of the queries it computes, the K/V
        it attends to (the tensors the kernel keeps for backward)."""
        q, kv = self.spans(rank)
        tq, tk = sum(b - a for a, b in q), sum(b - a for a, b in kv)
        return (2 * tq * n_heads + tk * 2 * n_kv_heads) * head_dim * elem_bytes

    def summary(self, n_heads: int = 1, n_kv_heads: int = 1, head_dim: int = 1, elem_bytes: int = 1) -> dict:
        """Balance before / after, moved shards, bytes received per rank (max) and memory
        balance (max / mean bytes held for attention), for reporting before running."""
        shape = (n_heads, n_kv_heads, head_dim, elem_bytes)
        recv = [self.bytes_received(r, *shape) for r in range(self.world)]
        mem = [self.memory(r, *shape) for r in range(self.world)]
        return dict(
            balance_before=round(self.home_balance(), 4),
            balance_after=round(self.balance(), 4),
            shards=len(self.shards),
            bytes_per_rank_max=max(recv),
            bytes_per_rank_mean=sum(recv) / len(recv),
            memory_balance=round(_ratio(mem), 4),
        )


def _ratio(xs) -> float:
    mean = sum(xs) / len(xs)
    return max(xs) / mean if mean > 0 else 1.0


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged half-open ranges covering ``spans``."""
    merged: list[list[int]] = []
    for a, b in sorted(x for x in spans if x[1] > x[0]):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _indices(spans: list[tuple[int, int]]) -> torch.Tensor:
    if not spans:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat([torch.arange(a, b) for a, b in spans])


class _Grid:
    """Owners of row positions in chunks of equal size (the layouts cut the row in P or 2P)."""

    def __init__(self, seq_len: int, world: int, layout: str):
        runs = owner_runs(seq_len, world, layout)
        chunks = sorted((a, b, r) for r, rr in enumerate(runs) for a, b in rr)
        self.size, self.owner = chunks[0][1] - chunks[0][0], [r for _, _, r in chunks]

    def owners(self, lo: int, hi: int) -> dict[int, int]:
        """{rank: tokens of row positions [lo, hi) it holds}."""
        out: dict[int, int] = {}
        for ch in range(lo // self.size, (hi - 1) // self.size + 1) if hi > lo else ():
            a, b = max(lo, ch * self.size), min(hi, (ch + 1) * self.size)
            out[self.owner[ch]] = out.get(self.owner[ch], 0) + b - a
        return out


def _in_rows(spans: list[tuple[int, int]], n: int):
    """Flat ranges -> row-position ranges, cut at row boundaries."""
    for a, b in spans:
        while a < b:
            end = min(b, (a // n + 1) * n)
            yield a % n, (end - 1) % n + 1
            a = end


def _owned(lo: int, hi: int, runs: list[tuple[int, int]]) -> int:
    """Tokens of [lo, hi) inside the ranges ``runs``."""
    return sum(max(0, min(hi, b) - max(lo, a)) for a, b in runs)


def segments(cu_seqlens, batch: int, seq_len: int) -> list[tuple[int, int, int]]:
    """Documents cut at row boundaries: [(row, start, end)] in row positions, in flat order.
    ``cu_seqlens``: flat document starts [n + 1] (a tensor or a sequence of ints)."""
    cu = sorted(set(int(x) for x in torch.as_tensor(cu_seqlens).tolist()) | {b * seq_len for b in range(batch + 1)})
    cu = [x for x in cu if 0 <= x <= batch * seq_len]
    return [(a // seq_len, a % seq_len, a % seq_len + b - a) for a, b in zip(cu[:-1], cu[1:]) if b > a]


class _DocCost:
    """Keys and cost of queries [lo, hi) of a document segment (closed forms)."""

    def __init__(self, causal: bool, window: int | None):
        self.causal, self.window = causal, window

    def keys(self, seg_i: int, seg, lo: int, hi: int) -> tuple[int, int]:
        return key_range(lo, hi, seg[1], seg[2], self.causal, self.window)

    def pairs(self, seg_i: int, seg, lo: int, hi: int) -> int:
        return pair_count(lo, hi, seg[1], seg[2], self.causal, self.window)


def mask_segments(mask, batch: int, seq_len: int) -> list[tuple[int, int, int]]:
    """Each row cut at every query bound of its slices: [(row, start, end)], in flat order."""
    out = []
    for b in range(batch):
        cuts = sorted({0, seq_len} | {x for s in mask.row(b) for x in (s.q0, s.q1)})
        out += [(b, a, e) for a, e in zip(cuts, cuts[1:]) if e > a]
    return out


class _SliceCost:
    """Keys and cost of queries [lo, hi) of a segment under a SliceMask: the slices covering
    the segment (each covers it whole, segments being cut at every slice bound), clipped."""

    def __init__(self, mask, segs, n_heads: int):
        self.n = mask.seq_len
        self.per_seg = []
        for row, a, e in segs:
            cover = [s for s in mask.row(row) if s.q0 <= a and e <= s.q1]
            self.per_seg.append([(s, n_heads if s.heads is None else len(s.heads)) for s in cover])

    def _clipped(self, seg_i: int, lo: int, hi: int):
        for s, w in self.per_seg[seg_i]:
            t = s.clip(lo, hi, 0, self.n)
            if t is not None:
                yield t, w

    def keys(self, seg_i: int, seg, lo: int, hi: int) -> tuple[int, int]:
        spans = [(t.k0, t.k1) for t, _ in self._clipped(seg_i, lo, hi)]
        return (min(a for a, _ in spans), max(b for _, b in spans)) if spans else (lo, lo)

    def pairs(self, seg_i: int, seg, lo: int, hi: int) -> int:
        return sum(t.area() * w for t, w in self._clipped(seg_i, lo, hi))


class _Mover:
    """Scores and cuts shards for the greedy (bytes per pair of moving a piece to rank d)."""

    def __init__(self, runs, qrow: int, kvrow: int, min_shard: int, cost):
        self.runs, self.qrow, self.kvrow, self.min_shard = runs, qrow, kvrow, min_shard
        self.cost = cost

    def piece(self, s: Shard, lo: int, hi: int, seg: tuple[int, int, int], rank: int) -> Shard:
        klo, khi = self.cost.keys(s.seg, seg, lo, hi)
        cost = self.cost.pairs(s.seg, seg, lo, hi)
        return replace(s, lo=lo, hi=hi, klo=klo, khi=khi, cost=cost, rank=rank)

    def bytes_to(self, s: Shard, d: int) -> int:
        runs = self.runs[d]
        q_away = s.hi - s.lo - _owned(s.lo, s.hi, runs)
        kv_away = s.khi - s.klo - _owned(s.klo, s.khi, runs)
        return 2 * q_away * self.qrow + kv_away * self.kvrow  # Q out and O back, K/V out

    def candidates(self, s: Shard, seg, d: int, room: int, gain: int):
        """Pieces of ``s`` worth moving to ``d``: the whole shard if its cost fits ``room``
        (or still lowers the maximum, cost < ``gain``), else a head and a tail cut to fit."""
        if s.cost <= room or (s.cost < gain and s.hi - s.lo < 2 * self.min_shard):
            yield self.piece(s, s.lo, s.hi, seg, d), None
            return
        if s.hi - s.lo < 2 * self.min_shard:
            return
        for head in (True, False):
            lo_n, hi_n = self.min_shard, s.hi - s.lo - self.min_shard  # piece length bounds
            while lo_n < hi_n:  # the longest piece whose cost fits the room
                mid = (lo_n + hi_n + 1) // 2
                a, b = (s.lo, s.lo + mid) if head else (s.hi - mid, s.hi)
                if self.cost.pairs(s.seg, seg, a, b) <= room:
                    lo_n = mid
                else:
                    hi_n = mid - 1
            a, b = (s.lo, s.lo + lo_n) if head else (s.hi - lo_n, s.hi)
            moved = self.piece(s, a, b, seg, d)
            if moved.cost < gain:
                rest = self.piece(s, b, s.hi, seg, s.rank) if head else self.piece(s, s.lo, a, seg, s.rank)
                yield moved, rest


def plan_cad(
    cu_seqlens: torch.Tensor,
    batch: int,
    seq_len: int,
    world: int,
    layout: str = "zigzag",
    *,
    causal: bool = True,
    window: int | None = None,
    min_shard: int = 128,
    tolerance: float = 1.1,
    nanos: int = 1,
    qrow_bytes: int = 2,
    kvrow_bytes: int = 1,
    mask=None,
    n_heads: int = 1,
) -> CADPlan:
    """The CAD plan for a [B, N] batch with document starts ``cu_seqlens`` (flat, [n + 1]).
    ``qrow_bytes`` / ``kvrow_bytes``: relative bytes of one query row (Q or O: H heads) and one
    key/value row (K and V: 2 Hkv heads), for choosing what to move; e.g. (H, 2 * Hkv).
    ``mask``: a SliceMask replacing the documents (then ``cu_seqlens``, ``causal`` and ``window``
    are not used), costed per head over ``n_heads`` query heads."""
    if min_shard < 1:
        raise ValueError(f"parallel.cp.options.softmax.min_shard={min_shard} must be >= 1: set it to e.g. 128")
    if tolerance < 1.0:
        raise ValueError(f"parallel.cp.options.softmax.tolerance={tolerance} must be >= 1.0: set it to e.g. 1.1")
    if nanos not in (1, 2):
        raise ValueError(f"nano-batches={nanos} must be 1 or 2 (parallel.cp.options.softmax.ping_pong)")
    if mask is None:
        segs = segments(cu_seqlens, batch, seq_len)
        cost = _DocCost(causal, window)
    else:
        segs = mask_segments(mask, batch, seq_len)
        cost = _SliceCost(mask, segs, n_heads)
    runs = owner_runs(seq_len, world, layout)
    mover = _Mover(runs, qrow_bytes, kvrow_bytes, min_shard, cost)
    per_rank: list[list[Shard]] = [[] for _ in range(world)]
    grid = _Grid(seq_len, world, layout)
    for i, (row, start, end) in enumerate(segs):  # the layout's placement: one shard per chunk
        for ch in range(start // grid.size, (end - 1) // grid.size + 1):
            lo, hi, r = max(start, ch * grid.size), min(end, (ch + 1) * grid.size), grid.owner[ch]
            per_rank[r].append(mover.piece(Shard(i, row, lo, hi, 0, 0, 0, r), lo, hi, segs[i], r))
    load = [sum(s.cost for s in shards) for shards in per_rank]
    home = list(load)
    mean = sum(load) / world
    for _ in range(10 * world + sum(len(x) for x in per_rank)):  # a bound; each move lowers load[s]
        s = max(range(world), key=lambda r: (load[r], -r))
        d = min(range(world), key=lambda r: (load[r], r))
        if load[s] <= tolerance * mean or s == d:
            break
        room, gain = int(min(load[s] - mean, mean - load[d])), load[s] - load[d]
        best = None
        for j, sh in enumerate(per_rank[s]):
            for moved, rest in mover.candidates(sh, segs[sh.seg], d, room, gain):
                key = (mover.bytes_to(moved, d) / max(moved.cost, 1), -moved.cost, sh.row, moved.lo)
                if best is None or key < best[0]:
                    best = (key, j, moved, rest)
        if best is None:
            break  # nothing on the most loaded rank lowers the maximum
        _, j, moved, rest = best
        per_rank[s][j : j + 1] = [] if rest is None else [rest]
        per_rank[d].append(moved)
        load[s] -= moved.cost
        load[d] += moved.cost
    shards = []
    for shards_r in per_rank:
        shards += _split_nanos(shards_r, nanos)
    shards.sort(key=lambda s: (s.row, s.lo))
    starts = torch.tensor([row * seq_len + start for row, start, _ in segs], dtype=torch.int64)
    return CADPlan(world, batch, seq_len, layout, causal, window, shards, home, load, starts, mask)


def _split_nanos(shards: list[Shard], nanos: int) -> list[Shard]:
    """Assign a rank's shards to nano-batches, largest first to the lighter one."""
    if nanos == 1:
        return list(shards)
    cost = [0, 0]
    out = []
    for s in sorted(shards, key=lambda s: (-s.cost, s.row, s.lo)):
        n = 0 if cost[0] <= cost[1] else 1
        cost[n] += s.cost
        out.append(replace(s, nano=n))
    return out
