"""Packing documents into fixed-length rows, and dealing rows to data-parallel ranks.

The token stream: for epoch e = 0, 1, ..., the source's documents in the order
``torch.randperm(len(source))`` seeded with ``seed + e``, each tokenized and followed by
``eos_id`` (the eos belongs to the document it ends). Row k is the window
``stream[k*N : k*N + N + 1]`` (N = ``seq_len``): inputs = window[:-1], labels = window[1:].
Consecutive windows share one token (row k's last label is row k+1's first input), so
every token is an input exactly once and no token is dropped. Documents cross row (and
epoch) boundaries freely; a document cut by a row end continues at the next row's start.

Per row (N tokens):
  input_ids  [N] int64
  labels     [N] int64   the next token; -100 where the input is a document's eos (never
                         predict across documents)
  cu_seqlens [k+1] int32 start offsets of the k document pieces in the row, then N:
                         starts at 0, strictly increasing. A piece continuing from the
                         previous row starts at 0.
  positions  [N] int64   position within the document piece, 0 at every piece start.

Positions: two choices exist for a document continuing from the previous row -- continue
its count (RoPE sees true distances to the earlier part, but that part is not in this
row's attention anyway, and positions then depend on the previous row), or restart at 0
at the row start. We restart, so every row is self-contained: attention (bounded by
cu_seqlens) and positions agree, and a row can be rebuilt from its tokens alone.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class PackedDataset:
    """Deterministic, resumable, endless stream of packed rows (see the module docstring).

    ``next(ds)`` returns one row dict; ``state_dict()`` is a few integers: the cursor
    (epoch, index into that epoch's permutation, token offset into that document) where
    the next row starts. Loading it re-tokenizes one document and continues bit-identically.
    """

    def __init__(self, source, tokenizer, seq_len: int, seed: int = 0):
        if len(source) == 0:
            raise ValueError(
                "the data source has no documents for this split: add documents "
                "(data.paths) or change data.val_fraction"
            )
        if seq_len < 1:
            raise ValueError(f"data.seq_len={seq_len} must be >= 1")
        self.source, self.tokenizer, self.seq_len, self.seed = source, tokenizer, seq_len, seed
        self.cursor = (0, 0, 0)  # (epoch, index into the epoch's permutation, token offset)
        self.rows = 0  # rows produced (or skipped) so far: the global row index
        self._perms: dict[int, list[int]] = {}
        self._cache: OrderedDict = OrderedDict()

    # -- the token stream ------------------------------------------------------------------
    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = torch.randperm(len(self.source), generator=g).tolist()
        return self._perms[epoch]

    def _tokens(self, epoch: int, j: int) -> list[int]:
        key = (epoch, j)
        if key not in self._cache:
            text = self.source[self._perm(epoch)[j]]
            self._cache[key] = self.tokenizer.encode(text) + [self.tokenizer.eos_id]
            if len(self._cache) > 4:
                self._cache.popitem(last=False)
        return self._cache[key]

    def _take(self, cursor, k: int):
        """The next ``k`` stream tokens from ``cursor``: (tokens, indices of document-ending
        eos tokens among them, cursor after them)."""
        e, j, off = cursor
        out, ends = [], []
        while len(out) < k:
            toks = self._tokens(e, j)
            piece = toks[off : off + k - len(out)]
            out += piece
            off += len(piece)
            if off == len(toks):
                ends.append(len(out) - 1)
                e, j, off = (e, j + 1, 0) if j + 1 < len(self.source) else (e + 1, 0, 0)
        return out, ends, (e, j, off)

    # -- rows ------------------------------------------------------------------------------
    def next_row(self) -> dict:
        n = self.seq_len
        toks, ends, cursor = self._take(self.cursor, n)
        last, _, _ = self._take(cursor, 1)
        self.cursor, self.rows = cursor, self.rows + 1
        window = torch.tensor(toks + last, dtype=torch.int64)
        labels = window[1:].clone()
        labels[ends] = -100
        cu = torch.tensor([0] + [t + 1 for t in ends if t + 1 < n] + [n], dtype=torch.int32)
        lengths = torch.diff(cu).long()
        positions = torch.arange(n) - torch.repeat_interleave(cu[:-1].long(), lengths)
        return {"input_ids": window[:-1], "labels": labels, "positions": positions, "cu_seqlens": cu}

    def skip_row(self) -> None:
        """Advance past one row without building it (rows dealt to other dp ranks)."""
        _, _, self.cursor = self._take(self.cursor, self.seq_len)
        self.rows += 1

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.next_row()

    # -- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        e, j, off = self.cursor
        return {
            "epoch": e,
            "doc": j,
            "offset": off,
            "rows": self.rows,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_docs": len(self.source),
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("packing", "stream") != "stream":
            raise ValueError(
                f"the data loader state was saved with data.packing={sd['packing']}, this run streams: "
                f"resume with data.packing={sd['packing']}"
            )
        now = {"seed": self.seed, "seq_len": self.seq_len, "num_docs": len(self.source)}
        saved = {k: sd[k] for k in now}
        if saved != now:
            raise ValueError(
                f"the data loader state was saved with {saved} but the data is now "
                f"{now}: resume with the same data settings (data.seq_len, "
                "data.seed, data.paths / data.source, data.val_fraction)"
            )
        self.cursor = (int(sd["epoch"]), int(sd["doc"]), int(sd["offset"]))
        self.rows = int(sd["rows"])


OFFSETS = ("cu_seqlens", "segments")  # per-row start offsets (ending N): flattened over the batch
LISTS = ("roles",)  # one entry per segment: concatenated


def collate(rows: list[dict]) -> dict:
    """Stack B rows of N tokens: input_ids/labels/positions [B, N] int64; cu_seqlens int32
    over the flattened B*N tokens (row b's offsets + b*N; ends with B*N). Prompt/completion rows
    (trainer/data/sft.py) also carry ``segments`` (offset like cu_seqlens) and ``roles`` (concatenated)."""
    n = rows[0]["input_ids"].shape[0]
    out = {k: torch.stack([r[k] for r in rows]) for k in rows[0] if k not in OFFSETS + LISTS}  # + any other [N] key
    for key in OFFSETS:
        if key in rows[0]:
            starts = [r[key][:-1] + b * n for b, r in enumerate(rows)]
            out[key] = torch.cat(starts + [torch.tensor([len(rows) * n], dtype=torch.int32)])
    for key in LISTS:
        if key in rows[0]:
            out[key] = torch.cat([r[key] for r in rows])
    return out


class DataLoaderShard:
    """This data-parallel rank's batches: global row i goes to rank ``i % dp_size``; each
    batch is ``micro_batch`` of this rank's rows, collated (see ``collate``). Endless;
    ``iter()`` continues where the last batch stopped."""

    def __init__(self, dataset: PackedDataset, dp_rank: int = 0, dp_size: int = 1, micro_batch: int = 1):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
        if micro_batch < 1:
            raise ValueError(f"data.micro_batch={micro_batch} must be >= 1")
        self.dataset, self.dp_rank, self.dp_size, self.micro_batch = dataset, dp_rank, dp_size, micro_batch
        self.rows = 0  # rows this rank has consumed

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows = []
        for _ in range(self.micro_batch):
            while self.dataset.rows % self.dp_size != self.dp_rank:
                self.dataset.skip_row()
            rows.append(self.dataset.next_row())
        self.rows += len(rows)
        return collate(rows)

    def state_dict(self) -> dict:
        return {
            "dataset": self.dataset.state_dict(),
            "rows": self.rows,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "micro_batch": self.micro_batch,
        }

    def load_state_dict(self, sd: dict) -> None:
        self.dataset.load_state_dict(sd["dataset"])
        self.rows = int(sd["rows"])
