"""Document boundaries for linear attention: ``cu_seqlens`` <-> per-token reset flags.

Shapes:
    cu_seqlens  [n_docs + 1] int     document start offsets over the flattened [B * T] batch,
                                     ending with B * T; every row start is a boundary
    starts      [B, T] bool          True where a document begins
    resets      [B, T] bool          True where the recurrent state is zeroed *before* the token
                                     (a document start that is not a row start); column 0 is
                                     False so that ``initial_state`` reaches each row's first
                                     document
    doc         [B, T] int           document id of every token
"""
from __future__ import annotations

import torch


def starts_from_cu_seqlens(cu_seqlens: torch.Tensor | None, batch: int, seq_len: int,
                           device=None) -> torch.Tensor:
    """[B, T] bool document-start flags; None means one document per row."""
    starts = torch.zeros(batch * seq_len, dtype=torch.bool, device=device)
    if cu_seqlens is None:
        starts[::seq_len] = True
        return starts.view(batch, seq_len)
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    if int(cu[-1]) != batch * seq_len:
        raise ValueError(f"cu_seqlens must end at B * T = {batch * seq_len}, got {int(cu[-1])}")
    starts[cu[:-1]] = True
    starts[::seq_len] = True     # every row start is a boundary
    return starts.view(batch, seq_len)


def resets_from_cu_seqlens(cu_seqlens: torch.Tensor | None, batch: int, seq_len: int,
                           device=None) -> torch.Tensor:
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


def cu_seqlens_from_doc_ids(doc: torch.Tensor) -> torch.Tensor:
    """doc [B, T] document ids -> cu_seqlens [n + 1] int64 (a new id or a new row starts a doc)."""
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    return cu_seqlens_from_starts(starts)
