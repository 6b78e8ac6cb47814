"""The training mix: long documents up- (or down-)sampled to a share of the characters, and
synthetic passkey and key-value recall documents added (``data.long_ratio``,
``data.passkey_fraction``, ``data.mqar_fraction``).

ProLong-style: long-context training keeps short documents in the mix and raises the share of
long ones. With L characters in long documents (at least ``long_min_chars``) and S in short
ones, each long document appears r = ratio * S / ((1 - ratio) * L) times (the fractional part
decided per document by a seeded draw), so long documents hold about ``ratio`` of the characters.
The result is a source like the others (``len``, ``[i] -> str``); the packer shuffles it.
"""

from __future__ import annotations

import math
import random

from trainer.data.synthetic import copy_text, kv_recall_text, passkey_text


class MixedSource:
    def __init__(
        self,
        base,
        long_min_chars: int = 4096,
        long_ratio: float | None = None,
        passkey_fraction: float = 0.0,
        passkey_doc_chars=(256, 512),
        seed: int = 0,
        mqar_fraction: float = 0.0,
        mqar_doc_chars=(256, 512),
        mqar_pairs: int = 4,
        copy_fraction: float = 0.0,
        copy_doc_chars=(10, 40),
        copy_repeats=(2, 4),
        passkey_edge_fraction: float = 0.0,
    ):
        self.base, self.seed, self.passkey_doc_chars = base, seed, list(passkey_doc_chars)
        self.passkey_edge_fraction = passkey_edge_fraction
        index = list(range(len(base)))
        if long_ratio is not None:
            size = getattr(base, "doc_size", None) or (lambda i: len(base[i]))
            sizes = [size(i) for i in index]
            long_chars = sum(s for s in sizes if s >= long_min_chars)
            short_chars = sum(s for s in sizes if s < long_min_chars)
            if long_chars == 0 or short_chars == 0:
                raise ValueError(
                    f"data.long_ratio={long_ratio} needs long and short documents, but every document is "
                    f"{'shorter' if long_chars == 0 else 'longer'} than data.long_min_chars={long_min_chars}: "
                    "change data.long_min_chars"
                )
            r = long_ratio * short_chars / ((1 - long_ratio) * long_chars)
            rng = random.Random(seed)
            index = []
            for i, s in enumerate(sizes):
                copies = 1 if s < long_min_chars else math.floor(r) + (rng.random() < r - math.floor(r))
                index += [i] * copies
            self.repeat = r
        self.n_passkey = round(passkey_fraction * len(index))
        self.index = index
        # key-value recall documents (several named keys, every one queried) after the passkey ones
        self.n_mqar = round(mqar_fraction * len(index))
        self.mqar_doc_chars, self.mqar_pairs = list(mqar_doc_chars), mqar_pairs
        self.n_copy = round(copy_fraction * len(index))  # repeated random strings (induction), last
        self.copy_doc_chars, self.copy_repeats = tuple(copy_doc_chars), tuple(copy_repeats)

    def __len__(self) -> int:
        return len(self.index) + self.n_passkey + self.n_mqar + self.n_copy

    def __getitem__(self, i: int) -> str:
        if i < len(self.index):
            return self.base[self.index[i]]
        rng = random.Random(self.seed * 1_000_003 + i)
        if i >= len(self.index) + self.n_passkey + self.n_mqar:
            return copy_text(rng, *self.copy_doc_chars, *self.copy_repeats)
        if i >= len(self.index) + self.n_passkey:
            return kv_recall_text(rng.choice(self.mqar_doc_chars), self.mqar_pairs, rng)
        depth = rng.random()
        if self.passkey_edge_fraction and rng.random() < self.passkey_edge_fraction:
            depth = rng.choice((0.0, 1.0))  # the needle first, or right before the question
        return passkey_text(rng.choice(self.passkey_doc_chars), depth, rng)
