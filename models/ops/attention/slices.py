"""A mask as a list of slices over the global row, the builders of every mask family, and the
naive dense form the tests compare against.

A slice is a rectangle of (query, key) row positions [q0, q1) x [k0, k1), cut by at most two
diagonals: key k is allowed for query q iff ``lo <= k - q <= hi`` (None: no bound), optionally
only for a subset of the query heads. MagiAttention's four slice types are the four ways of
placing the diagonals (flex_flash_attn's AttnMaskType):

    full        lo = hi = None                 every pair of the rectangle
    causal      hi = k1 - q1                   k - k0 <= q - q0 + (Lk - Lq): bottom-right aligned
    inv_causal  lo = k0 - q0                   k - k0 >= q - q0: top-left aligned
    bi_causal   lo = k0 - q0, hi = k1 - q1     both: a band (a sliding window's steady part)

Because the bounds are on ``k - q`` in row positions they survive cutting: the part of a slice
inside any smaller rectangle is a slice with the same bounds (``Slice.clip``). The kernel cuts
slices by the runs of positions each (Q chunk, K chunk) pair holds; CP strategies cut them by
rank, CAD by shard. A mask is a set of slices that never overlap (``check_disjoint``): softmax
counts every allowed pair once.

Shapes: a ``SliceMask`` holds the slices of every batch row of a [B, N] batch (one tuple shared
by all rows when the mask does not depend on the row); ``dense`` gives bool [H, Tq, Tk] for row
positions q_pos [Tq], k_pos [Tk].

Builders (row length n, document lengths ``lengths`` summing to n for the varlen ones):
full, causal, varlen_full, varlen_causal, sliding_window, varlen_sliding_window, prefix_lm,
varlen_prefix_lm, shared_question, causal_blockwise, block_causal, varlen_block_causal,
global_sliding_window, longlora (S^2-Attn), sinklora (SF-Attn), and ``documents`` (today's
packed documents with causal / sliding window, from ``cu_seqlens``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("full", "causal", "inv_causal", "bi_causal")


@dataclass(frozen=True)
class Slice:
    """Queries [q0, q1) x keys [k0, k1) where ``lo <= k - q <= hi``; ``heads``: the query heads
    it applies to (sorted, None: all)."""

    q0: int
    q1: int
    k0: int
    k1: int
    lo: int | None = None
    hi: int | None = None
    heads: tuple[int, ...] | None = None

    @property
    def kind(self) -> str:
        """full / causal / inv_causal / bi_causal, or band when the diagonals cut elsewhere."""
        lo_cuts = self.lo is not None and self.k0 - (self.q1 - 1) < self.lo
        hi_cuts = self.hi is not None and self.k1 - 1 - self.q0 > self.hi
        lo_tl = not lo_cuts or self.lo == self.k0 - self.q0
        hi_br = not hi_cuts or self.hi == self.k1 - self.q1
        if not (lo_tl and hi_br):
            return "band"
        return {(False, False): "full", (False, True): "causal", (True, False): "inv_causal"}.get(
            (lo_cuts, hi_cuts), "bi_causal"
        )

    def area(self) -> int:
        """Allowed (query, key) pairs (per head), exact."""
        return pairs(self.q0, self.q1, self.k0, self.k1, self.lo, self.hi)

    def clip(self, q0: int, q1: int, k0: int, k1: int) -> Slice | None:
        """The part inside queries [q0, q1) x keys [k0, k1), shrunk to the rows and columns
        that hold an allowed pair; None when empty."""
        a, b, c, d = max(q0, self.q0), min(q1, self.q1), max(k0, self.k0), min(k1, self.k1)
        for _ in range(3):  # shrinking one side can shrink the other; a fixed point within 2 rounds
            if a >= b or c >= d:
                return None
            if self.hi is not None:  # query q sees no key above q + hi
                a, d = max(a, c - self.hi), min(d, b + self.hi)
            if self.lo is not None:  # query q sees no key below q + lo
                b, c = min(b, d - self.lo), max(c, a + self.lo)
        if a >= b or c >= d:
            return None
        s = Slice(a, b, c, d, self.lo, self.hi, self.heads)
        return s if s.area() > 0 else None

    def allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """bool [Tq, Tk] for row positions q_pos [Tq], k_pos [Tk] (heads not applied)."""
        q, k = q_pos[:, None], k_pos[None, :]
        m = (q >= self.q0) & (q < self.q1) & (k >= self.k0) & (k < self.k1)
        if self.lo is not None:
            m &= k - q >= self.lo
        if self.hi is not None:
            m &= k - q <= self.hi
        return m


def make_slice(q0: int, q1: int, k0: int, k1: int, kind: str = "full", heads=None) -> Slice:
    """A slice of one of MagiAttention's four types (module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"slice type {kind!r} is unknown: choose one of {KINDS}")
    if not (0 <= q0 <= q1 and 0 <= k0 <= k1):
        raise ValueError(f"slice [{q0}, {q1}) x [{k0}, {k1}) has a negative or reversed range")
    lo = k0 - q0 if kind in ("inv_causal", "bi_causal") else None
    hi = k1 - q1 if kind in ("causal", "bi_causal") else None
    return Slice(q0, q1, k0, k1, lo, hi, None if heads is None else tuple(sorted(heads)))


def _pos_sum(a: int, c: int, x0: int, x1: int) -> int:
    """sum over integers x in [x0, x1) of max(0, a x + c), for a in {-1, 0, 1}."""
    if x1 <= x0:
        return 0
    if a == 0:
        return max(0, c) * (x1 - x0)
    if a == 1:  # positive for x > -c
        x0 = max(x0, -c + 1)
    else:  # positive for x < c
        x1 = min(x1, c)
    if x1 <= x0:
        return 0
    n = x1 - x0
    return a * (x0 + x1 - 1) * n // 2 + c * n


def pairs(q0: int, q1: int, k0: int, k1: int, lo: int | None, hi: int | None) -> int:
    """Allowed pairs of a slice: sum over q of |[max(k0, q + lo), min(k1 - 1, q + hi)]|."""
    cuts = sorted(
        {q0, q1}
        | {
            x
            for x in (None if hi is None else k1 - 1 - hi, None if lo is None else k0 - lo)
            if x is not None and q0 < x < q1
        }
    )
    total = 0
    for x0, x1 in zip(cuts, cuts[1:]):
        # on [x0, x1) the min and the max pick one side each: count = a q + c
        a, c = 0, k1 - 1
        if hi is not None and x0 + hi < k1 - 1:
            a, c = 1, hi
        if lo is not None and x0 + lo >= k0:
            a, c = a - 1, c - lo
        else:
            c -= k0
        total += _pos_sum(a, c + 1, x0, x1)
    return total


@dataclass(frozen=True)
class SliceMask:
    """The slices of every batch row of a [B, ``seq_len``] batch: ``rows[b]``, or ``rows[0]`` for
    every row when it holds one tuple. ``name``: the builder, for messages."""

    rows: tuple[tuple[Slice, ...], ...]
    seq_len: int
    name: str = "slices"

    def row(self, b: int) -> tuple[Slice, ...]:
        return self.rows[0] if len(self.rows) == 1 else self.rows[b]

    def area(self, b: int = 0, n_heads: int = 1) -> int:
        """(query head, query, key) pairs the mask allows in row b."""
        return sum(s.area() * (n_heads if s.heads is None else len(s.heads)) for s in self.row(b))

    def check(self, batch: int | None = None, n_heads: int | None = None) -> None:
        """ValueError for slices outside the row or the heads, overlapping slices, or a row count
        that does not match ``batch``."""
        if batch is not None and len(self.rows) not in (1, batch):
            raise ValueError(f"mask {self.name!r} has {len(self.rows)} rows for a batch of {batch}")
        for row in self.rows:
            for s in row:
                if not (0 <= s.q0 <= s.q1 <= self.seq_len and 0 <= s.k0 <= s.k1 <= self.seq_len):
                    raise ValueError(f"mask {self.name!r}: {s} lies outside the row of {self.seq_len} tokens")
                if n_heads is not None and s.heads is not None and not all(0 <= h < n_heads for h in s.heads):
                    raise ValueError(f"mask {self.name!r}: {s} names a head outside 0..{n_heads - 1} (model.n_heads)")
            check_disjoint(row, self.name)


def check_disjoint(row, name: str = "slices") -> None:
    """ValueError if two slices of one row share an allowed (head, query, key)."""
    order = sorted(row, key=lambda s: s.q0)
    for i, s in enumerate(order):
        for t in order[i + 1 :]:
            if t.q0 >= s.q1:
                break
            if s.heads is not None and t.heads is not None and not set(s.heads) & set(t.heads):
                continue
            lo = max((x for x in (s.lo, t.lo) if x is not None), default=None)
            hi = min((x for x in (s.hi, t.hi) if x is not None), default=None)
            both = Slice(s.q0, s.q1, s.k0, s.k1, lo, hi).clip(t.q0, t.q1, t.k0, t.k1)
            if both is not None:
                raise ValueError(f"mask {name!r}: slices {s} and {t} overlap (each pair must be in one slice)")


def dense(slices, q_pos: torch.Tensor, k_pos: torch.Tensor, n_heads: int, heads=None) -> torch.Tensor:
    """The naive form: bool [H, Tq, Tk], allowed pairs of row positions q_pos [Tq], k_pos [Tk]
    for the local query heads whose global heads are ``heads`` (None: 0..H-1)."""
    heads = list(range(n_heads)) if heads is None else list(heads)
    out = torch.zeros(n_heads, len(q_pos), len(k_pos), dtype=torch.bool)
    for s in slices:
        m = s.allowed(q_pos, k_pos)
        for h, g in enumerate(heads):
            if s.heads is None or g in s.heads:
                out[h] |= m
    return out


# ----------------------------------------------------------------------------- builders
def _one(n: int, slices, name: str) -> SliceMask:
    return SliceMask((tuple(s for s in slices if s.q1 > s.q0 and s.k1 > s.k0),), n, name)


def _docs(lengths) -> list[tuple[int, int]]:
    lengths = [int(x) for x in lengths]
    if any(x < 1 for x in lengths):
        raise ValueError(f"document lengths must be >= 1, got {lengths}")
    out, a = [], 0
    for x in lengths:
        out.append((a, a + x))
        a += x
    return out


def full(n: int) -> SliceMask:
    return varlen_full([n])


def causal(n: int) -> SliceMask:
    return varlen_causal([n])


def varlen_full(lengths) -> SliceMask:
    """Bidirectional inside each document."""
    return _one(sum(lengths), [make_slice(a, b, a, b) for a, b in _docs(lengths)], "varlen_full")


def varlen_causal(lengths) -> SliceMask:
    """Causal inside each document."""
    return _one(sum(lengths), [make_slice(a, b, a, b, "causal") for a, b in _docs(lengths)], "varlen_causal")


def _window_slices(a: int, b: int, w: int) -> list[Slice]:
    """Causal sliding window of w keys (the query's own included) over queries and keys [a, b):
    a causal square, then the bi_causal band."""
    if w < 1:
        raise ValueError(f"sliding window={w} must be >= 1")
    edge = min(b, a + w - 1)  # queries before it see every key from a
    out = [make_slice(a, edge, a, edge, "causal")] if edge > a else []
    if b > edge:
        out.append(make_slice(edge, b, edge - w + 1, b, "bi_causal"))
    return out


def sliding_window(n: int, window: int) -> SliceMask:
    return varlen_sliding_window([n], window)


def varlen_sliding_window(lengths, window: int) -> SliceMask:
    """Each query sees its last ``window`` keys (itself included) inside its document."""
    return _one(sum(lengths), [s for a, b in _docs(lengths) for s in _window_slices(a, b, window)], "sliding_window")


def prefix_lm(n: int, prefix: int) -> SliceMask:
    return varlen_prefix_lm([n], [prefix])


def varlen_prefix_lm(lengths, prefixes) -> SliceMask:
    """Per document: its first ``prefix`` tokens see each other (bidirectional), the rest is
    causal and sees the whole prefix."""
    if len(prefixes) != len(lengths):
        raise ValueError(f"prefix-LM needs one prefix length per document: {len(prefixes)} for {len(lengths)}")
    out = []
    for (a, b), p in zip(_docs(lengths), prefixes):
        if not 0 <= p <= b - a:
            raise ValueError(f"prefix={p} must lie in 0..{b - a} (the document's length)")
        out += [make_slice(a, a + p, a, a + p), make_slice(a + p, b, a, b, "causal")]
    return _one(sum(lengths), out, "prefix_lm")


def shared_question(question: int, answers) -> SliceMask:
    """One question (causal) and several answers packed after it: each answer sees the whole
    question and itself (causal), never another answer."""
    return varlen_shared_question([(question, list(answers))])


def varlen_shared_question(groups) -> SliceMask:
    """Several (question length, [answer lengths]) groups packed one after another."""
    out, a = [], 0
    for q, answers in groups:
        if q < 1 or any(x < 1 for x in answers):
            raise ValueError(f"shared question: lengths must be >= 1, got question={q}, answers={answers}")
        out.append(make_slice(a, a + q, a, a + q, "causal"))
        s = a + q
        for x in answers:
            out += [make_slice(s, s + x, a, a + q), make_slice(s, s + x, s, s + x, "causal")]
            s += x
        a = s
    return _one(a, out, "shared_question")


def causal_blockwise(n: int, block: int) -> SliceMask:
    """Blocks of ``block`` tokens: every block sees the first block and itself (causal)."""
    _check_block(block)
    out = [make_slice(0, min(block, n), 0, min(block, n), "causal")]
    for a in range(block, n, block):
        b = min(n, a + block)
        out += [make_slice(a, b, 0, block), make_slice(a, b, a, b, "causal")]
    return _one(n, out, "causal_blockwise")


def _check_block(block: int) -> None:
    if block < 1:
        raise ValueError(f"block={block} must be >= 1")


def block_causal(n: int, block: int) -> SliceMask:
    return varlen_block_causal([n], block)


def varlen_block_causal(lengths, block: int) -> SliceMask:
    """Per document: bidirectional inside blocks of ``block`` tokens, causal across blocks (a
    block sees every earlier block of its document)."""
    _check_block(block)
    out = [
        make_slice(q, min(b, q + block), a, min(b, q + block)) for a, b in _docs(lengths) for q in range(a, b, block)
    ]
    return _one(sum(lengths), out, "block_causal")


def global_sliding_window(n: int, sinks: int, window: int) -> SliceMask:
    """The first ``sinks`` tokens (causal among themselves) are seen by every query; beyond them
    each query sees its last ``window`` keys (StreamingLLM's attention sinks)."""
    if not 0 <= sinks <= n:
        raise ValueError(f"sinks={sinks} must lie in 0..{n}")
    out = [make_slice(0, sinks, 0, sinks, "causal"), make_slice(sinks, n, 0, sinks)]
    return _one(n, out + _window_slices(sinks, n, window), "global_sliding_window")


def _groups(a: int, b: int, group: int, shift: int) -> list[tuple[int, int]]:
    """[a, b) cut in groups of ``group`` tokens, the first cut at a + shift (shift < group)."""
    cuts = [a] + list(range(a + shift if shift else a + group, b, group)) + [b]
    return [(x, y) for x, y in zip(cuts, cuts[1:]) if y > x]


def _check_heads(n_heads: int, group: int) -> None:
    if n_heads < 2 or n_heads % 2:
        raise ValueError(f"S^2-Attn shifts half of the heads: model.n_heads={n_heads} must be even")
    if group < 2:
        raise ValueError(f"S^2-Attn group size={group} must be >= 2")


def longlora(n: int, group: int, n_heads: int) -> SliceMask:
    """LongLoRA's S^2-Attn: causal attention inside groups of ``group`` tokens; the second half
    of the heads use groups shifted by group / 2 (the first shifted group is the first group / 2
    tokens; no wrap-around, so no token sees a later one)."""
    _check_heads(n_heads, group)
    first, second = tuple(range(n_heads // 2)), tuple(range(n_heads // 2, n_heads))
    out = [make_slice(x, y, x, y, "causal", first) for x, y in _groups(0, n, group, 0)]
    out += [make_slice(x, y, x, y, "causal", second) for x, y in _groups(0, n, group, group // 2)]
    return _one(n, out, "longlora")


def sinklora(n: int, group: int, n_heads: int, sinks: int) -> SliceMask:
    """SinkLoRA's SF-Attn: S^2-Attn's groups (``longlora``) plus ``sinks`` global tokens every
    query sees (sinks <= group / 2, so they lie in the first group of both halves)."""
    _check_heads(n_heads, group)
    if not 0 <= sinks <= group // 2:
        raise ValueError(f"sinklora sinks={sinks} must lie in 0..group/2={group // 2}")
    base = longlora(n, group, n_heads).rows[0]
    out = list(base) + [make_slice(s.q0, s.q1, 0, sinks, "full", s.heads) for s in base if s.q0 > 0 and sinks]
    return _one(n, out, "sinklora")


def documents(cu_seqlens, batch: int, seq_len: int, causal: bool = True, window: int | None = None) -> SliceMask:
    """Packed documents (``cu_seqlens`` over the flattened [B * N] batch, None: one per row),
    causal or not, with an optional sliding window: today's document mask as slices."""
    if cu_seqlens is None:
        cu = list(range(0, batch * seq_len + 1, seq_len))
    else:
        cu = sorted({int(x) for x in torch.as_tensor(cu_seqlens).tolist()} | {b * seq_len for b in range(batch + 1)})
    rows = []
    for b in range(batch):
        lo, hi = b * seq_len, (b + 1) * seq_len
        starts = [x - lo for x in cu if lo <= x <= hi]
        out = []
        for a, e in zip(starts, starts[1:]):
            if window is None:
                out.append(make_slice(a, e, a, e, "causal" if causal else "full"))
            elif causal:
                out += _window_slices(a, e, window)
            else:  # |q - k| < window
                out.append(Slice(a, e, a, e, -(window - 1), window - 1))
        rows.append(tuple(out))
    if len(set(rows)) == 1:
        rows = rows[:1]
    return SliceMask(tuple(rows), seq_len, "documents")


BUILDERS = {
    "full": full,
    "causal": causal,
    "varlen_full": varlen_full,
    "varlen_causal": varlen_causal,
    "sliding_window": sliding_window,
    "varlen_sliding_window": varlen_sliding_window,
    "prefix_lm": prefix_lm,
    "varlen_prefix_lm": varlen_prefix_lm,
    "shared_question": shared_question,
    "varlen_shared_question": varlen_shared_question,
    "causal_blockwise": causal_blockwise,
    "block_causal": block_causal,
    "varlen_block_causal": varlen_block_causal,
    "global_sliding_window": global_sliding_window,
    "longlora": longlora,
    "sinklora": sinklora,
}


# ----------------------------------------------------------------------------- from config
# parameters a builder gets from the batch / the model rather than from model.mask_args
_FROM_BATCH = {"n", "lengths", "n_heads"}


def builder_params(name: str) -> list[str]:
    """The parameters of builder ``name`` that ``model.mask_args`` sets."""
    import inspect

    return [p for p in inspect.signature(BUILDERS[name]).parameters if p not in _FROM_BATCH]


def check_recipe(name: str, args: dict) -> None:
    """ValueError naming model.mask / model.mask_args for an unknown builder or parameter."""
    if name not in BUILDERS:
        raise ValueError(f"model.mask={name!r} is unknown: choose one of {sorted(BUILDERS)}")
    want = builder_params(name)
    unknown = sorted(set(args) - set(want))
    missing = sorted(set(want) - set(args))
    if unknown or missing:
        raise ValueError(
            f"model.mask={name} takes model.mask_args {want}: "
            + (f"unknown {unknown}" if unknown else "")
            + ("; " if unknown and missing else "")
            + (f"missing {missing}" if missing else "")
        )


@dataclass(frozen=True)
class MaskRecipe:
    """A mask chosen by configuration (``model.mask``, ``model.mask_args``), built per batch:
    builders over one row take the row length, varlen ones each row's document lengths (from
    the batch's ``cu_seqlens``), S^2 ones the model's head count."""

    name: str
    args: tuple[tuple[str, object], ...] = ()

    @classmethod
    def of(cls, name: str, args: dict | None = None) -> MaskRecipe:
        args = dict(args or {})
        check_recipe(name, args)
        return cls(name, tuple(sorted((k, _freeze(v)) for k, v in args.items())))

    def build(self, batch: int, seq_len: int, cu_seqlens, n_heads: int) -> SliceMask:
        """The SliceMask of a [batch, seq_len] batch with document starts ``cu_seqlens`` (flat)."""
        fn = BUILDERS[self.name]
        args = {k: _thaw(v) for k, v in self.args}
        params = inspect_params(fn)
        if "n_heads" in params:
            args["n_heads"] = n_heads
        if "lengths" not in params:
            rows = fn(seq_len, **args).rows if "n" in params else fn(**args).rows
        else:
            rows = []
            for b in range(batch):
                lengths = _row_lengths(cu_seqlens, b, seq_len)
                row_args = dict(args)
                if isinstance(row_args.get("prefixes"), int):  # one prefix length for every document
                    row_args["prefixes"] = [min(row_args["prefixes"], x) for x in lengths]
                rows.append(fn(lengths, **row_args).rows[0])
            rows = tuple(rows[:1] if len(set(rows)) == 1 else rows)
        mask = SliceMask(rows, seq_len, self.name)
        ends = [max((max(s.q1, s.k1) for s in row), default=0) for row in rows]
        if max(ends) > seq_len or (self.name in ("shared_question", "varlen_shared_question") and min(ends) != seq_len):
            raise ValueError(
                f"model.mask={self.name} with model.mask_args {dict(self.args)} covers {max(ends)} tokens, "
                f"not the batch rows' {seq_len} (data.seq_len): make the lengths add up to it"
            )
        return mask


def _freeze(v):
    """Lists (Hydra ListConfig too) -> tuples, recursively: a recipe is hashable (plan caches)."""
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        return v
    return tuple(_freeze(x) for x in v)


def _thaw(v):
    return [_thaw(x) for x in v] if isinstance(v, tuple) else v


def inspect_params(fn) -> list[str]:
    import inspect

    return list(inspect.signature(fn).parameters)


def _row_lengths(cu_seqlens, b: int, seq_len: int) -> list[int]:
    """Document lengths of row b (documents cut at the row's ends), from flat starts."""
    lo, hi = b * seq_len, (b + 1) * seq_len
    cu = [] if cu_seqlens is None else [int(x) for x in torch.as_tensor(cu_seqlens).tolist()]
    starts = sorted({lo, hi} | {x for x in cu if lo < x < hi})
    return [e - a for a, e in zip(starts, starts[1:])]
