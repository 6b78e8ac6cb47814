"""Sharding a packed batch along the sequence for context parallelism.

Layouts (P = CP world size, N = global row length):
  contiguous: rank r holds tokens [r*N/P, (r+1)*N/P)          needs N % P == 0
  zigzag:     the row is cut into 2P chunks; rank r holds chunks r and 2P-1-r, which
              balances causal attention work exactly            needs N % (2P) == 0
Inputs, labels and positions are permuted by the same index, so RoPE and the loss see
every token exactly where it was.
"""

from __future__ import annotations

import torch

LAYOUTS = ("contiguous", "zigzag")


def check_divisible(seq_len: int, cp: int, layout: str) -> None:
    """Raise a clear error before any collective if ``seq_len`` cannot be sharded."""
    if layout not in LAYOUTS:
        raise ValueError(f"parallel.cp.layout={layout!r} is unknown: choose one of {LAYOUTS}")
    need = 2 * cp if layout == "zigzag" else cp
    if seq_len % need:
        what = f"2*cp={need}" if layout == "zigzag" else f"cp={need}"
        raise ValueError(
            f"sequence length {seq_len} is not divisible by {what} for {layout} "
            f"sharding: set data.seq_len to a multiple of {need}"
        )


def rank_chunks(cp: int, layout: str) -> list[list[int]]:
    """chunks[r]: the chunks of a row rank r holds, in its local order, where the row is cut
    into P (contiguous) or 2P (zigzag) equal chunks numbered in row order. Every other view of
    the layout (token index, position ranges, LASP segments, CAD owners) derives from this."""
    if layout == "contiguous":
        return [[r] for r in range(cp)]
    if layout == "zigzag":
        return [[r, 2 * cp - 1 - r] for r in range(cp)]
    raise ValueError(f"parallel.cp.layout={layout!r} is unknown: choose one of {LAYOUTS}")


def rank_runs(seq_len: int, cp: int, layout: str) -> list[list[tuple[int, int]]]:
    """runs[r]: the row-position ranges [a, b) rank r holds, one per chunk, in local order."""
    check_divisible(seq_len, cp, layout)
    chunks = rank_chunks(cp, layout)
    c = seq_len // (cp * len(chunks[0]))
    return [[(j * c, (j + 1) * c) for j in mine] for mine in chunks]


def local_index(seq_len: int, rank: int, cp: int, layout: str) -> torch.Tensor:
    """Global positions (within a row) of the tokens that ``rank`` holds, in local order. [C]"""
    return torch.cat([torch.arange(a, b) for a, b in rank_runs(seq_len, cp, layout)[rank]])


def shard_batch(batch: dict, rank: int, cp: int, layout: str) -> dict:
    """Keep this rank's tokens of every [B, N] tensor in ``batch``; ``cu_seqlens`` (global,
    over the flattened batch) is kept whole. Adds ``local_index`` [C] and ``seq_len`` N."""
    n = batch["input_ids"].shape[1]
    idx = local_index(n, rank, cp, layout)
    out = {
        k: (v[:, idx.to(v.device)] if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == n else v)
        for k, v in batch.items()
    }
    out["local_index"] = idx
    out["seq_len"] = n
    return out


def unshard(
    local: torch.Tensor, gathered: list[torch.Tensor], seq_len: int, cp: int, layout: str, dim: int = 1
) -> torch.Tensor:
    """Reassemble the global tensor from every rank's shard (list ordered by rank)."""
    shape = list(local.shape)
    shape[dim] = seq_len
    full = local.new_empty(shape)
    for r, g in enumerate(gathered):
        full.index_copy_(dim, local_index(seq_len, r, cp, layout).to(local.device), g)
    return full
