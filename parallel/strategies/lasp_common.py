"""Pieces both LASP strategies (lasp2.py, lasp1.py) share: segments of the local tokens,
the intra-segment op, and the (optionally recomputed) segment summary and incoming-state term.

Shapes (local shards; C = tokens per rank): q, k [B, C, H, Dk], v [B, C, H, Dv], g [B, C, H],
gk [B, C, H, Dk]; starts [B, C] bool (document starts judged at global positions, from the
context's ``docs.starts``); states M, S [B, H, Dk, Dv] fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

from torch.utils.checkpoint import checkpoint

from models.ops.documents import cu_seqlens_from_starts
from models.ops.linear_attention import linear_attention, segment_output_from_state, segment_state
from parallel.sharding import rank_chunks


def local_segments(ctx) -> list[tuple[int, slice]]:
    """(global segment id, local token slice) of each local segment, in local order: the
    layout's chunks of the row (parallel/sharding.py), one segment each."""
    mine = rank_chunks(ctx.world_size, ctx.layout)[ctx.rank]
    c = ctx.local_index.numel() // len(mine)
    return [(seg, slice(j * c, (j + 1) * c)) for j, seg in enumerate(mine)]


def segment_owner(seg: int, world: int, layout: str) -> tuple[int, int]:
    """(rank, local segment index) holding global segment ``seg``."""
    for rank, mine in enumerate(rank_chunks(world, layout)):
        if seg in mine:
            return rank, mine.index(seg)
    raise ValueError(f"segment {seg} is not one of the {layout} layout's chunks for {world} ranks")


def cut(x, sl: slice):
    """x[:, sl] for an optional [B, T, ...] tensor."""
    return None if x is None else x[:, sl]


def intra_linear_attention(q, k, v, g, gk, scale, resets, chunk_size, impl):
    """Local linear attention with zero incoming state and a fresh state at every ``resets``
    token (resets [B, C] bool; token 0 always restarts). -> o [B, C, H, Dv]."""
    cu = cu_seqlens_from_starts(resets.cpu())  # host-side: no device nonzero and read-back
    return linear_attention(q, k, v, g, gk, scale, cu_seqlens=cu, chunk_size=chunk_size, impl=impl)


def summarize(k, v, g, gk, starts, recompute: bool):
    """``segment_state`` (M, G, has_start); with ``recompute`` its intermediates are not kept
    for backward (recomputed from the inputs, which the intra op keeps anyway)."""
    if not recompute:
        return segment_state(k, v, g, gk, starts)
    return checkpoint(segment_state, k, v, g, gk, starts, use_reentrant=False, preserve_rng_state=False)


def state_term(q, s_in, g, gk, starts, scale, recompute: bool):
    """``segment_output_from_state`` [B, T, H, Dv] fp32/fp64, optionally recomputed."""
    if not recompute:
        return segment_output_from_state(q, s_in, g, gk, starts, scale)
    return checkpoint(
        segment_output_from_state, q, s_in, g, gk, starts, scale, use_reentrant=False, preserve_rng_state=False
    )


def state_bytes(elem_bytes: int) -> int:
    """States are fp64 for fp64 inputs, fp32 otherwise."""
    return 8 if elem_bytes == 8 else 4
