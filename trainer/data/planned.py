"""Whole-document packing for text sources: ``data.packing=best_fit|grouped`` without data=prepared.

The text loaders (the embedded corpus, text files, and their mix with synthetic documents:
trainer/data/mix.py) pack by streaming (trainer/data/packing.py), which cuts every document that
crosses a row end. A retrieval document cut between its needle and its question teaches nothing,
and the longer ones are cut most often: with rows of 256 tokens a 200-token passkey document stays
whole in about a fifth of the rows it lands in. ``best_fit`` and ``grouped`` keep every document of
at most a row whole, exactly as for prepared data (trainer/data/prepared.py, RowPlanner: the same
pool, the same cuts of longer documents into full rows, the same padding and the same row tensors),
reading the text source through an adapter that tokenizes a document when the packer draws it.

Document order: epoch e is ``torch.randperm(len(source))`` seeded with ``seed + e``, as the stream
packing draws it. The state (the order's epoch and position, the packer's pool) is a few integers
per waiting document: resume is exact.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from trainer.data.prepared import RowPlanner, build_row

TOKEN_CACHE = 16  # tokenized documents kept (the rows being built read the same few documents)


class TextCorpus:
    """A text source as RowPlanner and build_row read a prepared corpus: ``n_docs``,
    ``doc_len(g)`` (tokens, without the eos), ``tokens(g, a, b)`` [b - a] int64, ``eos_id``."""

    def __init__(self, source, tokenizer):
        self.source, self.tokenizer, self.eos_id = source, tokenizer, tokenizer.eos_id
        self.n_docs = len(source)
        self._lengths: dict[int, int] = {}
        self._tokens: OrderedDict = OrderedDict()

    def _ids(self, g: int) -> np.ndarray:
        if g in self._tokens:
            self._tokens.move_to_end(g)
        else:
            self._tokens[g] = np.asarray(self.tokenizer.encode(self.source[g]), np.int64)
            self._lengths[g] = len(self._tokens[g])
            if len(self._tokens) > TOKEN_CACHE:
                self._tokens.popitem(last=False)
        return self._tokens[g]

    def doc_len(self, g: int) -> int:
        if g not in self._lengths:
            self._ids(g)
        return self._lengths[g]

    def tokens(self, g: int, a: int, b: int) -> np.ndarray:
        return self._ids(g)[a:b]


class TextStream:
    """A text source's endless document order (module docstring), as RowPlanner draws it."""

    def __init__(self, corpus: TextCorpus, seed: int, name: str = "data"):
        self.corpus, self.seed, self.name = corpus, seed, name
        self.epoch = self.pos = 0
        self._perm: tuple[int, list[int]] | None = None

    def next_doc(self) -> int:
        if self.pos == self.corpus.n_docs:
            self.epoch, self.pos = self.epoch + 1, 0
        if self._perm is None or self._perm[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._perm = (self.epoch, torch.randperm(self.corpus.n_docs, generator=g).tolist())
        self.pos += 1
        return self._perm[1][self.pos - 1]

    def state_dict(self) -> list[int]:
        return [self.epoch, self.pos]

    def load_state_dict(self, sd) -> None:
        self.epoch, self.pos = int(sd[0]), int(sd[1])


class PlannedDataset:
    """Rows of a text source packed by ``packing`` (``best_fit`` or ``grouped``; ``group_rows``:
    the rows of one step, dp x micro_batch, for grouped). The interface of
    trainer.data.packing.PackedDataset: ``next_row()``, ``skip_row()``, ``rows``, state dicts."""

    def __init__(self, source, tokenizer, seq_len: int, seed: int = 0, packing: str = "best_fit", group_rows: int = 1):
        if len(source) == 0:
            raise ValueError(
                "the data source has no documents for this split: add documents "
                "(data.paths) or change data.val_fraction"
            )
        if packing not in ("best_fit", "grouped"):
            raise ValueError(f"PlannedDataset packs best_fit or grouped, not {packing!r} (stream: PackedDataset)")
        self.source, self.seq_len, self.seed, self.packing = source, seq_len, seed, packing
        self.corpus = TextCorpus(source, tokenizer)
        self.planner = RowPlanner([TextStream(self.corpus, seed)], [1.0], seq_len, packing, group_rows, seed)

    @property
    def rows(self) -> int:
        return self.planner.rows

    def next_row(self) -> dict:
        return build_row(self.planner.next_plan(), [self.corpus], self.seq_len)

    def skip_row(self) -> None:
        """Advance past one row without building it (rows dealt to other dp ranks): plans only."""
        self.planner.next_plan()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.next_row()

    def metrics(self) -> dict:
        """Padding share of the rows planned so far and share of documents cut (longer than a row)."""
        p = self.planner
        return {"data_pad": p.pad / max(p.rows * self.seq_len, 1), "data_cut": p.cut / max(p.docs, 1)}

    def _identity(self) -> dict:
        return {"seed": self.seed, "seq_len": self.seq_len, "num_docs": self.corpus.n_docs, "packing": self.packing}

    def state_dict(self) -> dict:
        return {**self._identity(), "planner": self.planner.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        saved = {k: sd.get(k) for k in self._identity()}
        if saved != self._identity():
            raise ValueError(
                f"the data loader state was saved with {saved} but the data is now {self._identity()}: "
                "resume with the same data settings (data.seq_len, data.seed, data.packing, data.paths / "
                "data.source, data.val_fraction)"
            )
        self.planner.load_state_dict(sd["planner"])
