"""Training rows from prepared corpora (``data=prepared``): memory-mapped, mixed, packed, resumable.

Documents: each source (``data.paths``, or each entry of ``data.sources``) is a PreparedCorpus.
Its split (train/val) is a seeded hash of the document index; its order in epoch e is a
seeded bijection of the document indices (a cycle-walking Feistel network), so no per-document
list is ever built and memory stays flat as the corpus grows. Long-document up-sampling
(ProLong-style ``long_ratio``) gives each long document (>= ``long_min_tokens``) floor(r) or
floor(r) + 1 copies per epoch (decided by a seeded hash), short ones one.

Mixture: the next document comes from the source furthest behind its weight in tokens
(argmax_s w_s * T - taken_s; ties: the first), so the realised token shares follow the weights
to within a document, deterministically.

Packing (``data.packing``), rows of N = ``data.seq_len`` positions; a document of L tokens takes
L + 1 (its eos). A row is a list of pieces (source, document, start, end), each piece its own
attention segment (cu_seqlens) with positions from 0:
  stream    documents back to back, cut at row ends (as trainer/data/packing.py); no padding
  best_fit  documents whole: each row is filled from a pool of ``POOL`` waiting documents with
            the longest that still fits, until none fits; the rest is padding (label -100).
            Only documents longer than a row are cut: into full rows, their tail joins the pool.
  grouped   best_fit's rows, grouped by attention work into steps: a window of ``GROUP_STEPS``
            steps' rows (a step: the dp x micro_batch rows trained at once) is sorted by the
            pairs its documents attend (sum of piece length squared), cut into steps of
            consecutive rows, and the steps are emitted in a seeded order. The ranks of a step then
            hold rows of similar attention work (a row of one long document beside rows of long
            documents, rows of short ones together), so no rank waits on another's longer
            attention (varlen / CAD keep each row's work; this balances the rows between ranks).
            Same rows, cuts and padding as best_fit; only their order changes, within a window.
Labels are the next token of the same document (-100 at its eos and on padding).

Rows go to data-parallel ranks round robin (global row i to rank i % dp), ``micro_batch`` per
batch. With ``data.num_workers`` > 0, DataLoader workers build the batches (worker w builds
batches w, w + W, ...; torch hands them back in order) while this process only plans rows, which
reads document lengths, never tokens. The state (each source's epoch and position, tokens taken,
the packer's pool) is a few integers per source plus the pool: resume is exact.
"""

from __future__ import annotations

import bisect
import copy
import math
import multiprocessing as mp
import warnings

import numpy as np
import torch

from trainer.data.packing import collate
from trainer.data.shards import PreparedCorpus, PreparedDataError

PACKINGS = ("stream", "best_fit", "grouped")
POOL = 256  # best_fit: documents waiting for a row
GROUP_STEPS = 32  # grouped: steps per window (more: better grouped, rows reordered further)
_M64 = (1 << 64) - 1
_SOURCE_KEYS = {"name", "paths", "weight", "long_ratio", "long_min_tokens"}


def _mix(x: int) -> int:
    """splitmix64's finalizer: a 64-bit bijective hash."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _mix_np(x: np.ndarray) -> np.ndarray:
    """_mix on a uint64 array (wrapping arithmetic, the same values)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _unit(x: int, salt: int) -> float:
    return _mix(x ^ salt) / 2.0**64


class Permutation:
    """A seeded bijection of [0, n): a 4-round Feistel network on the smallest even number of
    bits covering n, cycle-walked back into range. O(1) memory, a few microseconds per call."""

    def __init__(self, n: int, seed: int):
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.n, self.half, self.mask = n, bits // 2, (1 << bits // 2) - 1
        self.keys = [_mix(_mix(seed) + r) for r in range(4)]

    def __call__(self, i: int) -> int:
        x = i
        while True:
            left, right = x >> self.half, x & self.mask
            for k in self.keys:
                left, right = right, left ^ (_mix(right ^ k) & self.mask)
            x = (left << self.half) | right
            if x < self.n:
                return x


class DocStream:
    """One source's endless document order for one split (see the module docstring)."""

    def __init__(self, corpus, split, val_fraction, seed, long_ratio=None, long_min_tokens=4096, name="data"):
        self.corpus, self.split, self.name = corpus, split, name
        self.val_fraction, self.salt, self.seed = val_fraction, _mix(seed * 7919 + 17), seed
        n = corpus.n_docs
        self.fallback, counts, long_short = -1, [0, 0], [0, 0]
        best = (2.0, -1)
        for lo in range(0, n, 1 << 20):  # vectorised pass over the boundaries, chunk by chunk
            g = np.arange(lo, min(lo + (1 << 20), n), dtype=np.uint64)
            u = _mix_np(g ^ np.uint64(self.salt)) / 2.0**64
            val = u < val_fraction
            counts[1] += int(val.sum())
            i = int(np.argmin(u))
            best = min(best, (float(u[i]), lo + i))
        counts[0] = n - counts[1]
        if counts[1] == 0 and n > 1:  # the trainer always evaluates: the smallest hash goes to val
            self.fallback, counts = best[1], [n - 1, 1]
        self.shared = n == 1  # a one-document corpus serves both splits
        self.docs = 1 if self.shared else counts[split == "val"]
        if self.docs == 0:
            raise PreparedDataError(f"the source {name!r} has no {split} documents: change data.val_fraction")
        self.copies_max, self.r, self.long_min = 1, None, long_min_tokens
        if long_ratio is not None:
            for lo in range(0, n, 1 << 20):
                lengths = corpus.lengths(lo, min(lo + (1 << 20), n))
                mine = np.array([self.in_split(g) for g in range(lo, lo + len(lengths))])
                is_long = lengths >= long_min_tokens
                long_short[0] += int(lengths[mine & is_long].sum())
                long_short[1] += int(lengths[mine & ~is_long].sum())
            if 0 in long_short:
                raise PreparedDataError(
                    f"the source {name!r} has long_ratio={long_ratio} but every {split} document is "
                    f"{'shorter' if long_short[0] == 0 else 'longer'} than long_min_tokens={long_min_tokens}: "
                    "change long_min_tokens"
                )
            self.r = long_ratio * long_short[1] / ((1 - long_ratio) * long_short[0])
            self.copies_max = math.floor(self.r) + 1
        self.epoch, self.pos = 0, 0
        self._perm = None

    def in_split(self, g: int) -> bool:
        if self.shared:
            return True
        val = g == self.fallback or _unit(g, self.salt) < self.val_fraction
        return val == (self.split == "val")

    def copies(self, g: int) -> int:
        if self.r is None or self.corpus.doc_len(g) < self.long_min:
            return 1
        return math.floor(self.r) + (_unit(g, self.salt ^ 0x5BD1E995) < self.r - math.floor(self.r))

    def next_doc(self) -> int:
        size = self.corpus.n_docs * self.copies_max
        while True:
            if self.pos == size:
                self.epoch, self.pos = self.epoch + 1, 0
            if self._perm is None or self._perm[0] != self.epoch:
                self._perm = (self.epoch, Permutation(size, self.seed * 1_000_003 + self.epoch))
            v = self._perm[1](self.pos)
            self.pos += 1
            g, c = divmod(v, self.copies_max)
            if self.in_split(g) and c < self.copies(g):
                return g

    def state_dict(self) -> list[int]:
        return [self.epoch, self.pos]

    def load_state_dict(self, sd) -> None:
        self.epoch, self.pos = int(sd[0]), int(sd[1])


class RowPlanner:
    """The mixture and the packer: ``next_plan()`` -> the next global row as pieces
    [(source, document, start, end)] over the document's L + 1 positions. Reads lengths only."""

    def __init__(
        self,
        streams: list[DocStream],
        weights: list[float],
        seq_len: int,
        packing: str,
        group_rows: int = 1,
        seed: int = 0,
    ):
        self.streams, self.seq_len, self.packing = streams, seq_len, packing
        self.group_rows, self.seed = group_rows, seed  # grouped: rows per step (dp x micro_batch)
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        self.taken = [0] * len(streams)  # tokens of documents drawn, per source (the mixture's clock)
        self.seen = [0] * len(streams)  # tokens placed in rows, per source (what the model reads)
        self.rows = self.pad = self.docs = self.cut = 0
        self.current = None  # stream: [source, doc, length, offset] of the document being cut
        self.pool: list = []  # best_fit: sorted [length, seq, source, doc, start]
        self.ready: list = []  # best_fit: [source, doc, start, stop] full-row chunks of long documents
        self.seq = 0
        self.queue: list = []  # grouped: the window's rows still to emit, in emit order
        self.windows = 0  # grouped: windows planned so far (each window's step order is seeded by it)

    def _draw(self):
        t = sum(self.taken)
        s = max(range(len(self.streams)), key=lambda i: (self.weights[i] * t - self.taken[i], -i))
        g = self.streams[s].next_doc()
        length = self.streams[s].corpus.doc_len(g) + 1
        self.taken[s] += length
        self.docs += 1
        return s, g, length

    def next_plan(self) -> list[tuple[int, int, int, int]]:
        if self.packing == "grouped":
            plan = self._grouped()
        else:
            plan = self._stream() if self.packing == "stream" else self._best_fit()
        used = 0
        for s, _, a, b in plan:
            self.seen[s] += b - a
            used += b - a
        self.pad += self.seq_len - used
        self.rows += 1
        return plan

    def _stream(self):
        n, out = self.seq_len, []
        while n:
            if self.current is None:
                self.current = [*self._draw(), 0]
            s, g, length, off = self.current
            k = min(n, length - off)
            out.append((s, g, off, off + k))
            n -= k
            if off == 0 and k < length:
                self.cut += 1
            self.current = None if off + k == length else [s, g, length, off + k]
        return out

    def _best_fit(self):
        n = self.seq_len
        if not self.ready:
            while len(self.pool) < POOL and not self.ready:
                s, g, length = self._draw()
                if length > n:  # the only documents cut: into full rows, the tail to the pool
                    self.cut += 1
                    self.ready.append([s, g, 0, length // n * n])
                    if length % n:
                        bisect.insort(self.pool, [length % n, self.seq, s, g, length // n * n])
                else:
                    bisect.insort(self.pool, [length, self.seq, s, g, 0])
                self.seq += 1
        if self.ready:
            s, g, a, b = self.ready[0]
            self.ready[0][2] += n
            if a + n == b:
                self.ready.pop(0)
            return [(s, g, a, a + n)]
        out, space = [], n
        while self.pool:
            i = bisect.bisect_right(self.pool, [space, math.inf]) - 1
            if i < 0:
                break
            length, _, s, g, start = self.pool.pop(i)
            out.append((s, g, start, start + length))
            space -= length
        return out

    def _grouped(self):
        if not self.queue:
            rows = [self._best_fit() for _ in range(GROUP_STEPS * self.group_rows)]
            work = [sum((b - a) ** 2 for _, _, a, b in plan) for plan in rows]
            ranked = sorted(range(len(rows)), key=lambda i: (-work[i], i))  # most work first, stable
            order = Permutation(GROUP_STEPS, _mix(self.seed) + self.windows)
            self.windows += 1
            for k in range(GROUP_STEPS):
                step = order(k)
                self.queue += [
                    [list(p) for p in rows[i]] for i in ranked[step * self.group_rows : (step + 1) * self.group_rows]
                ]
        return [tuple(p) for p in self.queue.pop(0)]

    def state_dict(self) -> dict:
        keys = ("taken", "seen", "rows", "pad", "docs", "cut", "current", "pool", "ready", "seq", "queue", "windows")
        return {
            "streams": [st.state_dict() for st in self.streams],
            **copy.deepcopy({k: getattr(self, k) for k in keys}),
        }

    def load_state_dict(self, sd: dict) -> None:
        for st, x in zip(self.streams, sd["streams"]):
            st.load_state_dict(x)
        for k, v in copy.deepcopy(sd).items():
            if k != "streams":
                setattr(self, k, v)

    def shares(self) -> dict[str, float]:
        total = max(sum(self.seen), 1)
        return {st.name: x / total for st, x in zip(self.streams, self.seen)}


def build_row(plan, corpora: list[PreparedCorpus], seq_len: int, sources: bool = False) -> dict:
    """One row's tensors (as trainer/data/packing.py) from its pieces; padding after them.
    ``sources``: also ``source`` [N] int64, each token's source index (-1 on padding)."""
    x = np.full(seq_len, corpora[0].eos_id, np.int64)
    tag = np.full(seq_len, -1, np.int64)
    y = np.full(seq_len, -100, np.int64)
    pos = np.zeros(seq_len, np.int64)
    cu, t = [0], 0
    for s, g, a, b in plan:
        c = corpora[s]
        length = c.doc_len(g)
        ext = c.tokens(g, a, min(b + 1, length))  # positions a .. b of doc + [eos] + [-100]
        if b + 1 > length:
            tail = [c.eos_id, -100][max(a - length, 0) : b + 1 - length]
            ext = np.concatenate([ext, np.asarray(tail, np.int64)])
        k = b - a
        x[t : t + k], y[t : t + k], pos[t : t + k], tag[t : t + k] = ext[:k], ext[1 : k + 1], np.arange(k), s
        t += k
        cu.append(t)
    if t < seq_len:
        pos[t:] = np.arange(seq_len - t)
        cu.append(seq_len)
    row = {
        "input_ids": torch.from_numpy(x),
        "labels": torch.from_numpy(y),
        "positions": torch.from_numpy(pos),
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
    }
    if sources:
        row["source"] = torch.from_numpy(tag)
    return row


class _Batches(torch.utils.data.IterableDataset):
    """Inside DataLoader worker w of W: batches w, w + W, ... from a copy of the loader's state."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        loader = self.loader
        b = 0
        while True:
            plans = loader._plan_batch()
            if b % n == w:
                yield {"batch": loader._build(plans), "row": loader.planner.rows}
            b += 1


class PreparedLoader:
    """This data-parallel rank's batches from prepared data; the interface of DataLoaderShard
    (endless ``next()``, ``state_dict()`` / ``load_state_dict()``)."""

    def __init__(self, planner, corpora, dp_rank=0, dp_size=1, micro_batch=1, num_workers=0, fingerprint=None):
        self.planner, self.corpora = planner, corpora
        self.dp_rank, self.dp_size, self.micro_batch, self.num_workers = dp_rank, dp_size, micro_batch, num_workers
        self.fingerprint = fingerprint or {}
        self.rows = 0  # rows this rank has consumed
        self._it = None
        self.source_names = [st.name for st in planner.streams]
        self.tag_sources = False  # batches carry ``source`` [B, N] (the evaluation's loss per source)

    def _plan_batch(self):
        plans = []
        while len(plans) < self.micro_batch:
            mine = self.planner.rows % self.dp_size == self.dp_rank
            plan = self.planner.next_plan()
            if mine:
                plans.append(plan)
        return plans

    def _build(self, plans):
        return collate([build_row(p, self.corpora, self.planner.seq_len, self.tag_sources) for p in plans])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.num_workers and mp.current_process().daemon:  # e.g. a test harness's rank process
            warnings.warn(
                "data.num_workers: a daemonic process cannot start DataLoader workers; building batches here",
                stacklevel=2,
            )
            self.num_workers = 0  # the same batches, built in this process
        if self.num_workers == 0:
            batch = self._build(self._plan_batch())
        else:
            if self._it is None:
                dl = torch.utils.data.DataLoader(
                    _Batches(copy.deepcopy(self)), batch_size=None, num_workers=self.num_workers, prefetch_factor=4
                )
                self._it = iter(dl)
            out = next(self._it)
            self._plan_batch()  # this process keeps the exact position (lengths only)
            if out["row"] != self.planner.rows:
                raise RuntimeError(f"data worker batch ends at row {out['row']}, expected {self.planner.rows}")
            batch = out["batch"]
        self.rows += self.micro_batch
        return batch

    def __deepcopy__(self, memo):
        new = copy.copy(self)
        new.planner = copy.deepcopy(self.planner, memo)
        new._it = None
        return new

    def state_dict(self) -> dict:
        return {
            "prepared": self.planner.state_dict(),
            "rows": self.rows,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "micro_batch": self.micro_batch,
            "fingerprint": dict(self.fingerprint),
        }

    def load_state_dict(self, sd: dict) -> None:
        saved = sd.get("fingerprint")
        if "prepared" not in sd or saved != self.fingerprint:
            raise ValueError(
                f"the data loader state was saved with {saved} but the data is now {self.fingerprint}: "
                "resume with the same data settings (data.paths / data.sources, data.seq_len, data.seed, "
                "data.packing, data.val_fraction; with packing=grouped the same dp x data.micro_batch)"
            )
        self.planner.load_state_dict(sd["prepared"])
        self.rows = int(sd["rows"])
        self._it = None  # workers restart from the loaded position

    def metrics(self) -> dict:
        """What to log: realised token share per source, padding share, share of documents cut."""
        p = self.planner
        out = {f"data_share/{k}": v for k, v in p.shares().items()} if len(p.streams) > 1 else {}
        out["data_pad_share"] = p.pad / max(p.rows * p.seq_len, 1)
        out["data_cut_share"] = p.cut / max(p.docs, 1)
        return out


# --------------------------------------------------------------------------- config


def source_specs(d) -> list[dict]:
    """[{name, paths, weight, long_ratio, long_min_tokens}] from data.sources, or data.paths alone."""
    if d.sources:
        specs = []
        for i, s in enumerate(d.sources):
            s = dict(s)
            unknown = set(s) - _SOURCE_KEYS
            if unknown or not s.get("paths"):
                raise ValueError(
                    f"data.sources[{i}] {'has ' + str(sorted(unknown)) if unknown else 'needs paths'}: each source is "
                    f"{{name, paths, weight, long_ratio (optional), long_min_tokens (optional)}}"
                )
            paths = [s["paths"]] if isinstance(s["paths"], str) else list(s["paths"])
            weight = float(s.get("weight", 1.0))
            if not weight > 0:
                raise ValueError(f"data.sources[{i}].weight={weight} must be > 0")
            ratio = s.get("long_ratio")
            if ratio is not None and not 0.0 < float(ratio) < 1.0:
                raise ValueError(f"data.sources[{i}].long_ratio={ratio} must be in (0, 1), or null")
            specs.append(
                {
                    "name": str(s.get("name", f"source{i}")),
                    "paths": paths,
                    "weight": weight,
                    "long_ratio": None if ratio is None else float(ratio),
                    "long_min_tokens": int(s.get("long_min_tokens", 4096)),
                }
            )
        if len({s["name"] for s in specs}) != len(specs):
            raise ValueError("data.sources has two sources of one name: name each source once")
        return specs
    if not d.paths:
        raise ValueError("data=prepared needs data.paths (prepared directories) or data.sources (a mixture)")
    return [{"name": "data", "paths": list(d.paths), "weight": 1.0, "long_ratio": None, "long_min_tokens": 4096}]


def check_config(d) -> None:
    """validate()'s checks of the prepared-data settings (local, before any collective)."""
    if d.packing not in PACKINGS:
        raise ValueError(f"data.packing={d.packing!r} is unknown: choose one of {PACKINGS}")
    if d.source != "prepared":
        if d.sources:
            raise ValueError("data.sources needs prepared data: set data=prepared (python -m trainer.prepare first)")
        if d.source == "sft" and d.packing != "stream":
            raise ValueError(
                f"data.packing={d.packing} does not apply to data=sft: it packs whole examples itself "
                "(leave data.packing=stream)"
            )
        return
    if d.sources and d.paths:
        raise ValueError("give data.paths or data.sources, not both: put the paths into a source")
    if d.long_ratio is not None or max(d.passkey_fraction, d.mqar_fraction, d.copy_fraction) > 0:
        raise ValueError(
            "data.long_ratio and the synthetic documents (data.passkey_fraction, mqar_fraction, copy_fraction) "
            "apply to text sources: with data=prepared give long_ratio and long_min_tokens per entry of data.sources"
        )
    if d.num_workers < 0:
        raise ValueError(f"data.num_workers={d.num_workers} must be >= 0")
    from trainer.data.shards import read_manifest

    for i, s in enumerate(source_specs(d)):
        for p in s["paths"]:
            read_manifest(p, f"data.sources[{i}].paths" if d.sources else "data.paths")


def build_prepared_loaders(d, tokenizer, dp_rank: int, dp_size: int):
    """(train, val) PreparedLoaders for ``d`` (a DataConfig with source=prepared)."""
    from trainer.data.shards import tokenizer_info

    specs = source_specs(d)
    info = tokenizer_info(tokenizer)
    corpora = [PreparedCorpus(s["paths"], info, "data.sources" if d.sources else "data.paths") for s in specs]

    def loader(split, seed, workers):
        streams = [
            DocStream(
                c,
                split,
                d.val_fraction,
                seed * 1000 + i,
                s["long_ratio"] if split == "train" else None,  # val stays natural
                s["long_min_tokens"],
                s["name"],
            )
            for i, (s, c) in enumerate(zip(specs, corpora))
        ]
        group_rows = dp_size * d.micro_batch  # the rows of one step, across the data-parallel ranks
        planner = RowPlanner(streams, [s["weight"] for s in specs], d.seq_len, d.packing, group_rows, seed)
        fingerprint = {
            "sources": [[s["name"], s["weight"], c.n_docs, c.n_tokens] for s, c in zip(specs, corpora)],
            "seq_len": d.seq_len,
            "seed": seed,
            "packing": d.packing,
            "val_fraction": d.val_fraction,
        }
        if d.packing == "grouped":  # a step's rows are grouped across dp ranks: the grouping needs dp
            fingerprint["group_rows"] = group_rows
        return PreparedLoader(planner, corpora, dp_rank, dp_size, d.micro_batch, workers, fingerprint)

    train, val = loader("train", d.seed, d.num_workers), loader("val", d.seed + 1, 0)
    val.tag_sources = len(specs) > 1
    return train, val
