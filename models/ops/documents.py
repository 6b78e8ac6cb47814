"""Packed documents: the one home of every document-boundary representation.

A packed batch holds several documents per row. The convention everywhere is ``cu_seqlens``,
the start offsets of the documents over the flattened ``[B * N]`` batch, ending with ``B * N``
(every row start is also a document start). Kernels want other forms; they are all derived
here, once per batch, by the attention context (``Documents``):

    cu_seqlens  [n_docs + 1] int64   document starts over the flattened batch
    doc         [B, T] int64         document id of each token (the masks of softmax kernels)
    starts      [B, T] bool          a document begins at this token
    resets      [B, T] bool          zero a recurrent state before this token: a document
                                     start that is not a row start (column 0 is False, so an
                                     ``initial_state`` reaches each row's first document)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def doc_ids(cu_seqlens: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """Document id of each flattened token index given start offsets ``cu_seqlens``."""
    return torch.searchsorted(cu_seqlens.to(torch.int64), flat_index, right=True) - 1


def row_doc_ids(cu_seqlens: torch.Tensor, batch: int, seq_len: int, index: torch.Tensor) -> torch.Tensor:
    """Document ids [B, T] of row positions ``index`` [T] in every row of a [B, seq_len] batch."""
    flat = torch.arange(batch)[:, None] * seq_len + index[None, :]
    return doc_ids(cu_seqlens, flat)


def starts_from_cu_seqlens(cu_seqlens: torch.Tensor | None, batch: int, seq_len: int, device=None) -> torch.Tensor:
    """[B, T] bool document-start flags; None means one document per row."""
    starts = torch.zeros(batch * seq_len, dtype=torch.bool, device=device)
    if cu_seqlens is None:
        starts[::seq_len] = True
        return starts.view(batch, seq_len)
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    if int(cu[-1]) != batch * seq_len:
        raise ValueError(f"cu_seqlens must end at B * T = {batch * seq_len}, got {int(cu[-1])}")
    starts[cu[:-1]] = True
    starts[::seq_len] = True  # every row start is a boundary
    return starts.view(batch, seq_len)


def resets_from_cu_seqlens(cu_seqlens: torch.Tensor | None, batch: int, seq_len: int, device=None) -> torch.Tensor:
    """[B, T] bool: zero the state before this token (document starts inside a row)."""
    resets = starts_from_cu_seqlens(cu_seqlens, batch, seq_len, device).clone()
    resets[:, 0] = False
    return resets


def cu_seqlens_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """starts [B, T] bool -> cu_seqlens [n + 1] int64 (row starts are always included)."""
    b, t = starts.shape
    s = starts.clone()
    s[:, 0] = True
    flat = s.flatten().nonzero().flatten()
    return torch.cat([flat, flat.new_tensor([b * t])])


def starts_from_doc_ids(doc: torch.Tensor) -> torch.Tensor:
    """doc [B, T] -> [B, T] bool: a new id or a new row starts a document."""
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    return starts


def cu_seqlens_from_doc_ids(doc: torch.Tensor) -> torch.Tensor:
    """doc [B, T] document ids -> cu_seqlens [n + 1] int64 (a new id or a new row starts a doc)."""
    return cu_seqlens_from_starts(starts_from_doc_ids(doc))


def doc_lengths(cu_seqlens: torch.Tensor | None, batch: int, seq_len: int) -> list[int]:
    """Lengths of the documents of a packed [batch, seq_len] batch (a document crossing a row end
    counts as two: every row start is a boundary); None: one document per row."""
    if cu_seqlens is None:
        return [seq_len] * batch
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    check_cu_seqlens(cu, batch, seq_len)
    bounds = cu_seqlens_from_starts(starts_from_cu_seqlens(cu, batch, seq_len))
    return (bounds[1:] - bounds[:-1]).tolist()


def causal_pairs(doc_lens, window: int | None = None) -> int:
    """(query, key) pairs a causal mask allows inside documents of lengths ``doc_lens`` (the
    diagonal included): L (L + 1) / 2 each, or with a sliding window, each query sees its last
    ``min(i + 1, window)`` keys: w (w + 1) / 2 + (L - w) w for L > w. Exact integers."""
    total = 0
    for n in doc_lens:
        n = int(n)
        w = n if window is None else min(n, int(window))
        total += w * (w + 1) // 2 + (n - w) * w
    return total


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> None:
    """Document starts over the flattened [batch * seq_len] tokens: 1-D, from 0 to batch * seq_len,
    non-decreasing. Anything else silently gives tokens document id -1 or merges documents."""
    total = batch * seq_len
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D with at least 2 entries [0, ..., {total}], got shape {tuple(cu_seqlens.shape)}"
        )
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0 or last != total:
        raise ValueError(
            f"cu_seqlens runs from {first} to {last}: it must start at 0 and end at "
            f"batch * seq_len = {batch} * {seq_len} = {total}"
        )
    if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError(
            f"cu_seqlens is not sorted: {cu_seqlens.tolist()[:16]}...: document starts must be non-decreasing"
        )


@dataclass
class Documents:
    """Where a run of T tokens of a packed [B, N] batch sits, computed once per batch.

    index       [T]     row position of each token (its place in the unsharded row)
    doc         [B, T]  document id of each token
    starts      [B, T]  bool, a document starts at this token, judged at its *row* position
                        (position 0, or a document id different from the previous row position's)
    cu_seqlens  [n + 1] the tokens' documents as one-device cu_seqlens over the flattened
                        [B * T] local batch (a boundary wherever ``starts`` is set, and at row starts)
    """

    index: torch.Tensor
    doc: torch.Tensor
    starts: torch.Tensor
    cu_seqlens: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.cu_seqlens = cu_seqlens_from_starts(self.starts | starts_from_doc_ids(self.doc))

    @classmethod
    def of(cls, cu_seqlens: torch.Tensor, batch: int, seq_len: int, index: torch.Tensor | None = None) -> Documents:
        """Documents of row positions ``index`` [T] (default: the whole row) of a [B, seq_len]
        batch whose global document starts are ``cu_seqlens`` (None: one document per row)."""
        if cu_seqlens is None and index is None:  # one document per row: row b is document b
            index = torch.arange(seq_len)
            doc = torch.arange(batch)[:, None].expand(batch, seq_len)  # no [B, T] storage (kept to backward)
            return cls(index, doc, (index == 0)[None, :].expand(batch, seq_len))
        if cu_seqlens is None:
            cu_seqlens = torch.arange(0, batch * seq_len + 1, seq_len)
        cu = cu_seqlens.detach().to("cpu", torch.int64)
        check_cu_seqlens(cu, batch, seq_len)
        index = torch.arange(seq_len) if index is None else index
        doc = row_doc_ids(cu, batch, seq_len, index)
        prev = row_doc_ids(cu, batch, seq_len, (index - 1).clamp(min=0))
        return cls(index, doc, (index == 0)[None, :] | (doc != prev))
