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
     asynchronously through ``parallel.comm.all_gather_async`` (counted as "all_gather");
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

from models.ops.linear_attention import scan_segment_states
from parallel import comm
from parallel.strategies.base import LayerShape, LinearStrategy, register
from parallel.strategies.lasp_common import (
    cut,
    intra_linear_attention,
    local_segments,
    segment_owner,
    state_bytes,
    state_term,
    summarize,
)


# ----------------------------------------------------------------------------- the collective
def _pack(m, big_g, has_start, first_is_start) -> torch.Tensor:
    """-> [n] = M [B,H,Dk,Dv], G [B,H,Dk], has_start [B], first_is_start [B] flattened."""
    return torch.cat([m.flatten(), big_g.flatten(), has_start.to(m.dtype), first_is_start.to(m.dtype)])


def _unpack(x, b, h, dk, dv):
    """x [..., n] -> (M [..., B,H,Dk,Dv], G [..., B,H,Dk], has_start [..., B], first [..., B])."""
    lead = x.shape[:-1]
    m, big_g, has, first = x.split([b * h * dk * dv, b * h * dk, b, b], dim=-1)
    return (m.reshape(*lead, b, h, dk, dv), big_g.reshape(*lead, b, h, dk), has > 0.5, first > 0.5)


class GatherSummaries(torch.autograd.Function):
    """packed [S, n] on this rank -> gathered [P, S, n], from a ``comm.all_gather_async`` of
    packed.detach() already in flight. Backward: one reduce-scatter of d(gathered)."""

    @staticmethod
    def forward(ctx, packed, pending, group):
        ctx.group = group
        return pending.wait()

    @staticmethod
    def backward(ctx, grad):
        return comm.reduce_scatter(list(grad.unbind(0)), ctx.group), None, None


# ----------------------------------------------------------------------------- strategy
@register("lasp2", default="linear")
class LASP2(LinearStrategy):
    """Linear attention under CP with one all-gather of segment states per layer (LASP-2);
    any layout. Softmax attention is not provided (pair it with allgather: LASP-2H).

    recompute (default True): keep only the layer inputs for backward and recompute the
    segment summaries and the incoming-state term there (about 2x less saved memory than
    keeping their intermediates, for a little extra backward compute)."""

    layouts = ("contiguous", "zigzag")

    def __init__(self, recompute: bool = True):
        self.recompute = bool(recompute)

    def linear_attention(self, q, k, v, ctx, *, g=None, gk=None, scale=1.0, chunk_size=64, impl="auto"):
        """q, k [B, C, H, Dk], v [B, C, H, Dv], g [B, C, H], gk [B, C, H, Dk] -> o [B, C, H, Dv],
        exact against the single-device op on the whole row."""
        b, _, h, dk = q.shape
        dv = v.shape[-1]
        starts = ctx.docs.starts.to(q.device)  # [B, C]
        segs = local_segments(ctx)

        # 1. segment summaries -> all-gather in flight
        packed = []
        for _, sl in segs:
            m, big_g, has = summarize(k[:, sl], v[:, sl], cut(g, sl), cut(gk, sl), starts[:, sl], self.recompute)
            packed.append(_pack(m, big_g, has, starts[:, sl.start]))
        packed = torch.stack(packed)  # [S, n]
        pending = comm.all_gather_async(packed.detach(), ctx.group)

        # 2. intra-segment part, overlapped with the gather
        resets = starts.clone()
        for _, sl in segs:
            resets[:, sl.start] = True
        o = intra_linear_attention(q, k, v, g, gk, scale, resets, chunk_size, impl)

        # 3. exclusive scan over all segments in global order
        gathered = GatherSummaries.apply(packed, pending, ctx.group)  # [P, S, n]
        n_seg = len(segs) * ctx.world_size
        rows = [segment_owner(j, ctx.world_size, ctx.layout) for j in range(n_seg)]
        ordered = torch.stack([gathered[r, s] for r, s in rows])  # [P*S, n]
        s_in = scan_segment_states(*_unpack(ordered, b, h, dk, dv))  # [P*S, B,H,Dk,Dv]

        # 4. incoming-state term of each local segment
        out = []
        for j, sl in segs:
            inter = state_term(q[:, sl], s_in[j], cut(g, sl), cut(gk, sl), starts[:, sl], scale, self.recompute)
            out.append((o[:, sl].to(inter.dtype) + inter).to(o.dtype))
        return torch.cat(out, dim=1)

    def forward_bytes(self, shape: LayerShape) -> int:
        """(P-1) * S * (B*H*Dk*Dv + B*H*Dk + 2*B) * s (module docstring); H = n_heads (linear
        mixers have no GQA), Dv = head_dim, Dk = key_dim or head_dim. Flat in seq_len."""
        s = shape
        dk = s.key_dim or s.head_dim
        segments = 2 if s.layout == "zigzag" else 1
        per_segment = s.batch * s.n_heads * dk * s.head_dim + s.batch * s.n_heads * dk + 2 * s.batch
        return (s.cp - 1) * segments * per_segment * state_bytes(s.elem_bytes)
