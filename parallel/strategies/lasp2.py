"""LASP-2: sequence parallelism for (gated) linear attention, one all-gather per layer.

Shapes (local shards; P = CP world size, C = tokens per rank, S = segments per rank):
    q, k       [B, C, H, Dk]     v, o [B, C, H, Dv]     g [B, C, H]     gk [B, C, H, Dk]
    starts     [B, C] bool       a token starts a document (global position 0, or its document
                                 id differs from the one at the previous *global* position)
    M          [B, H, Dk, Dv]    a segment's end state for a zero incoming state (its last doc)
    G          [B, H, Dk]        the segment's total log-decay (scalar decay broadcast over Dk)
    packed     [S, n]            per segment M, G, has_start, first_is_start flattened,
                                 n = B*H*Dk*Dv + B*H*Dk + 2*B
    gathered   [P, S, n]         every rank's packed summaries, in rank order
States and the scan are fp32 (fp64 for fp64 inputs).

Segments are maximal runs of consecutive global positions: one per rank for the contiguous
layout (segment j = rank j), two for zigzag (global chunks r and 2P-1-r on rank r), so the
global order of the 2P segments interleaves the ranks: 0, 1, ..., P-1 are the first halves of
ranks 0..P-1, P..2P-1 the second halves of ranks P-1..0.

Forward on rank r:
  1. ``segment_state`` of each local segment -> packed; the all-gather of packed is issued
     asynchronously (bytes counted in ``parallel.comm.COUNTER`` as "all_gather");
  2. meanwhile, the intra-segment part: the chunked op on the local tokens with zero incoming
     state, with a reset at every local segment start (so the second zigzag segment does not
     see the first directly: it sees it through the scan, decayed across the chunks between);
  3. wait; ``scan_segment_states`` over all P*S segments in global order (every rank runs the
     same tiny scan redundantly) gives S_in of each segment;
  4. o += ``segment_output_from_state`` (q, S_in) of each local segment (only tokens before the
     segment's first document start receive S_in).
Batch rows are independent: every row start is a document start.

Backward: autograd through the local pieces. The collective is ``GatherSummaries``, whose
backward is ONE reduce-scatter (``comm.reduce_scatter``) of dL/d(gathered): rank j receives
the sum over ranks of the gradient of its own summaries, which is exact because every rank
ran the scan on the same gathered values.

Bytes one rank receives per layer in forward (and again in backward's reduce-scatter):
    (P - 1) * S * (B*H*Dk*Dv + B*H*Dk + 2*B) * s,   S = 1 contiguous / 2 zigzag,
    s = 4 (8 for fp64 inputs) -- independent of the sequence length.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from models.ops.linear_attention import (chunk_linear_attention, cu_seqlens_from_starts,
                                         doc_linear_attention, recurrent_linear_attention_ref,
                                         scan_segment_states, segment_output_from_state,
                                         segment_state)
from models.ops.linear_attention.interface import IMPLS
from parallel import comm
from parallel.strategies.base import Strategy, register


# ----------------------------------------------------------------------------- shared helpers
def document_starts(ctx) -> torch.Tensor:
    """[B, C] bool: local tokens that start a document, judged at their *global* positions."""
    idx = ctx.local_index
    prev = ctx.doc_of((idx - 1).clamp(min=0))
    return (idx == 0)[None, :] | (ctx.local_doc != prev)


def local_segments(ctx) -> list[tuple[int, slice]]:
    """(global segment id, local token slice) of each local segment, in local order."""
    c = ctx.local_index.numel()
    if ctx.layout == "contiguous":
        return [(ctx.rank, slice(0, c))]
    return [(ctx.rank, slice(0, c // 2)), (2 * ctx.world_size - 1 - ctx.rank, slice(c // 2, c))]


def segment_owner(seg: int, world: int, layout: str) -> tuple[int, int]:
    """(rank, local segment index) holding global segment ``seg``."""
    if layout == "contiguous" or seg < world:
        return seg, 0
    return 2 * world - 1 - seg, 1


def cut(x, sl: slice):
    """x[:, sl] for an optional [B, T, ...] tensor."""
    return None if x is None else x[:, sl]


def intra_linear_attention(q, k, v, g, gk, scale, resets, chunk_size, impl):
    """Local linear attention with zero incoming state and a fresh state at every ``resets``
    token (resets [B, C] bool; token 0 always restarts). -> o [B, C, H, Dv]."""
    if impl not in IMPLS:
        raise ValueError(f"linear_impl={impl!r}: choose one of {IMPLS}")
    cu = cu_seqlens_from_starts(resets.to(q.device))
    if impl == "naive":
        return recurrent_linear_attention_ref(q, k, v, g, gk, scale, cu_seqlens=cu)[0]
    backend = "auto" if impl == "auto" else "torch"
    return chunk_linear_attention(q, k, v, g, gk, scale, cu_seqlens=cu, chunk_size=chunk_size,
                                  backend=backend)[0]


def summarize(k, v, g, gk, starts, recompute: bool):
    """``segment_state`` (M, G, has_start); with ``recompute`` its intermediates are not kept
    for backward (recomputed from the inputs, which the intra op keeps anyway)."""
    if not recompute:
        return segment_state(k, v, g, gk, starts)
    return checkpoint(segment_state, k, v, g, gk, starts, use_reentrant=False,
                      preserve_rng_state=False)


def state_term(q, s_in, g, gk, starts, scale, recompute: bool):
    """``segment_output_from_state`` [B, T, H, Dv] fp32/fp64, optionally recomputed."""
    if not recompute:
        return segment_output_from_state(q, s_in, g, gk, starts, scale)
    return checkpoint(segment_output_from_state, q, s_in, g, gk, starts, scale,
                      use_reentrant=False, preserve_rng_state=False)


def state_bytes(elem_bytes: int) -> int:
    """States are fp64 for fp64 inputs, fp32 otherwise."""
    return 8 if elem_bytes == 8 else 4


# ----------------------------------------------------------------------------- the collective
def _pack(m, big_g, has_start, first_is_start) -> torch.Tensor:
    """-> [n] = M [B,H,Dk,Dv], G [B,H,Dk], has_start [B], first_is_start [B] flattened."""
    return torch.cat([m.flatten(), big_g.flatten(), has_start.to(m.dtype),
                      first_is_start.to(m.dtype)])


def _unpack(x, b, h, dk, dv):
    """x [..., n] -> (M [..., B,H,Dk,Dv], G [..., B,H,Dk], has_start [..., B], first [..., B])."""
    lead = x.shape[:-1]
    m, big_g, has, first = x.split([b * h * dk * dv, b * h * dk, b, b], dim=-1)
    return (m.reshape(*lead, b, h, dk, dv), big_g.reshape(*lead, b, h, dk), has > 0.5,
            first > 0.5)


class PendingGather:
    """An all-gather of x (same shape on every rank) in flight; ``wait()`` -> [P, *x.shape]."""

    def __init__(self, x: torch.Tensor, group):
        p = dist.get_world_size(group)
        x = x.contiguous()
        self.bufs = [torch.empty_like(x) for _ in range(p)]
        self.work = dist.all_gather(self.bufs, x, group=group, async_op=True)
        nbytes = (p - 1) * x.numel() * x.element_size()
        comm.COUNTER.add("all_gather", nbytes, nbytes)

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return torch.stack(self.bufs)


class GatherSummaries(torch.autograd.Function):
    """packed [S, n] on this rank -> gathered [P, S, n], from a ``PendingGather`` of
    packed.detach() already in flight. Backward: one reduce-scatter of d(gathered)."""

    @staticmethod
    def forward(ctx, packed, pending, group):
        ctx.group = group
        return pending.wait()

    @staticmethod
    def backward(ctx, grad):
        return comm.reduce_scatter(list(grad.unbind(0)), ctx.group), None, None


# ----------------------------------------------------------------------------- strategy
@register("lasp2")
class LASP2(Strategy):
    """Linear attention under CP with one all-gather of segment states per layer (LASP-2);
    any layout. Softmax attention is not provided (pair it with allgather: LASP-2H).

    recompute (default True): keep only the layer inputs for backward and recompute the
    segment summaries and the incoming-state term there (about 2x less saved memory than
    keeping their intermediates, for a little extra backward compute)."""

    layouts = ("contiguous", "zigzag")

    def __init__(self, recompute: bool = True):
        self.recompute = bool(recompute)

    def linear_attention(self, q, k, v, ctx, *, g=None, gk=None, scale=1.0, chunk_size=64,
                         impl="auto"):
        """q, k [B, C, H, Dk], v [B, C, H, Dv], g [B, C, H], gk [B, C, H, Dk] -> o [B, C, H, Dv],
        exact against the single-device op on the whole row."""
        if ctx.world_size == 1:
            return doc_linear_attention(q, k, v, ctx.local_doc.to(q.device), g, gk, scale,
                                        chunk_size=chunk_size, impl=impl)
        b, _, h, dk = q.shape
        dv = v.shape[-1]
        starts = document_starts(ctx).to(q.device)                          # [B, C]
        segs = local_segments(ctx)

        # 1. segment summaries -> all-gather in flight
        packed = []
        for _, sl in segs:
            m, big_g, has = summarize(k[:, sl], v[:, sl], cut(g, sl), cut(gk, sl),
                                      starts[:, sl], self.recompute)
            packed.append(_pack(m, big_g, has, starts[:, sl.start]))
        packed = torch.stack(packed)                                        # [S, n]
        pending = PendingGather(packed.detach(), ctx.group)

        # 2. intra-segment part, overlapped with the gather
        resets = starts.clone()
        for _, sl in segs:
            resets[:, sl.start] = True
        o = intra_linear_attention(q, k, v, g, gk, scale, resets, chunk_size, impl)

        # 3. exclusive scan over all segments in global order
        gathered = GatherSummaries.apply(packed, pending, ctx.group)        # [P, S, n]
        n_seg = len(segs) * ctx.world_size
        rows = [segment_owner(j, ctx.world_size, ctx.layout) for j in range(n_seg)]
        ordered = torch.stack([gathered[r, s] for r, s in rows])            # [P*S, n]
        s_in = scan_segment_states(*_unpack(ordered, b, h, dk, dv))         # [P*S, B,H,Dk,Dv]

        # 4. incoming-state term of each local segment
        out = []
        for j, sl in segs:
            inter = state_term(q[:, sl], s_in[j], cut(g, sl), cut(gk, sl), starts[:, sl],
                               scale, self.recompute)
            out.append((o[:, sl].to(inter.dtype) + inter).to(o.dtype))
        return torch.cat(out, dim=1)

    def forward_bytes(self, *, batch, seq_len, cp, n_heads, head_dim, elem_bytes, n_kv_heads=None,
                      layout="contiguous", key_dim=None) -> int:
        """(P-1) * S * (B*H*Dk*Dv + B*H*Dk + 2*B) * s (module docstring); H = n_heads (linear
        mixers have no GQA), Dv = head_dim, Dk = key_dim or head_dim. Flat in seq_len."""
        dk = key_dim or head_dim
        segments = 2 if layout == "zigzag" else 1
        per_segment = batch * n_heads * dk * head_dim + batch * n_heads * dk + 2 * batch
        return (cp - 1) * segments * per_segment * state_bytes(elem_bytes)
