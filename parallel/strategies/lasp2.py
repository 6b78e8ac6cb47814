"""LASP-2: sequence parallelism for (gated) linear attention, one all-gather per layer.

Shapes (local shards; P = CP world size, C = tokens per rank, S = segments per rank):
    q, k       [B, C, H, Dk]     v, o [B, C, H, Dv]     g [B, C, H]     gk [B, C, H, Dk]
    starts     [B, C] bool       a token starts a document (global position 0, or its document
                                 id differs from the one at the previous *global* position)
    M          [B, H, Dk, Dv]    a segment's end state for a zero incoming state (its last doc)
    transfer   [B, H, Dk]        how the segment carries its incoming state to its end: exp of
                                 its total log-decay, 0 if it holds a document start (token 0
                                 included), so S_end = transfer * S_in + M
    packed     [S, n]            per segment M, transfer flattened, n = B*H*Dk*Dv + B*H*Dk
    gathered   [P, S, n]         every rank's packed summaries, in rank order
States and the scan are fp32 (fp64 for fp64 inputs).

Segments are maximal runs of consecutive global positions: one per rank for the contiguous
layout (segment j = rank j), two for zigzag (global chunks r and 2P-1-r on rank r), so the
global order of the 2P segments interleaves the ranks: 0, 1, ..., P-1 are the first halves of
ranks 0..P-1, P..2P-1 the second halves of ranks P-1..0. Every rank runs the same tiny scan
over all P*S segments in global order (``scan_segment_states``) on the gathered summaries.

With the chunked torch op (impl "chunk", or "auto" off CUDA) one hand-written autograd
function, ``FusedLASP2``, runs the whole layer as ONE op call whose rows are the local
segments ([B*S, C/S, ...]; a row whose token 0 starts a document ignores S_in):
  forward: the op's own chunk scan gives (M, transfer) -> all-gather issued asynchronously
    (``incoming`` hook); the intra-chunk work runs while it is in flight; then the scan over
    segments gives S_in, which enters the op's chunk states (one multiply-add over the
    [NC, Dk, Dv] states, no pass over the tokens);
  backward: the op's reverse chunk scan gives dL/dS_in of each local segment -> all-gather
    issued asynchronously (``outgoing`` hook); the intra-chunk gradients run meanwhile; then
    the reverse scan over segments (``scan_segment_grads``) gives dL/dS_end of each local
    segment, which enters as the op's dL/dfinal_state.
Nothing but the op touches the tokens (its backward recomputes the chunk states, as always);
the all-gathers wait about 0.05 ms at P = 2 (measured): the local work hides them.

Otherwise (impl "naive", or fla's kernels on CUDA) the generic path, autograd throughout:
``segment_state`` of each local segment -> the same all-gather; meanwhile the intra-segment op
with zero incoming state (and a reset at every local segment start); wait, scan; o +=
``segment_output_from_state`` (q, S_in). The collective is ``GatherSummaries``, whose backward
is ONE reduce-scatter of dL/d(gathered) (exact: every rank ran the scan on the same values).
Batch rows are independent: every row start is a document start.

Bytes one rank receives per layer in forward:
    (P - 1) * S * (B*H*Dk*Dv + B*H*Dk) * s,   S = 1 contiguous / 2 zigzag,
    s = 4 (8 for fp64 inputs) -- independent of the sequence length; in backward the fused
path all-gathers dL/dS_in, (P - 1) * S * B*H*Dk*Dv * s, the generic path reduce-scatters
the forward's size.
"""

from __future__ import annotations

import torch

from models.ops.linear_attention import (
    linear_attention_bwd,
    linear_attention_fwd,
    runs_torch_chunk,
    scan_segment_grads,
    scan_segment_states,
    segment_transfer,
)
from parallel import comm
from parallel.strategies.base import LASPOptions, LayerShape, LinearStrategy, register
from parallel.strategies.lasp_common import (
    cut,
    intra_linear_attention,
    local_segments,
    segment_owner,
    state_bytes,
    state_term,
    summarize,
)


# ----------------------------------------------------------------------------- segments
class Segments:
    """Where this rank's S local segments sit among the P*S global ones: ``order`` the
    (rank, local index) of every global segment, ``mine`` the global ids of the local ones."""

    def __init__(self, ctx):
        self.group, self.world = ctx.group, ctx.world_size
        self.mine = [j for j, _ in local_segments(ctx)]
        self.order = [segment_owner(j, ctx.world_size, ctx.layout) for j in range(len(self.mine) * ctx.world_size)]

    def gather_async(self, packed):
        """packed [S, n] -> a pending all-gather of every rank's (``wait()`` -> [P, S, n])."""
        return comm.all_gather_async(packed.detach(), self.group)

    def ordered(self, gathered):
        """[P, S, n] -> [P*S, n] in global segment order."""
        return torch.stack([gathered[r, s] for r, s in self.order])


def _pack(m, transfer) -> torch.Tensor:
    """M [S, B,H,Dk,Dv], transfer [S, B,H,Dk] -> [S, n]."""
    return torch.cat([m.flatten(1), transfer.flatten(1)], dim=1)


def _unpack(x, b, h, dk, dv):
    """x [J, n] -> (M [J, B,H,Dk,Dv], transfer [J, B,H,Dk])."""
    m, transfer = x.split([b * h * dk * dv, b * h * dk], dim=-1)
    return m.unflatten(1, (b, h, dk, dv)), transfer.unflatten(1, (b, h, dk))


def _rows_to_segments(x, s: int):
    """[B*S, ...] (the fused op's rows) -> [S, B, ...]."""
    return x.unflatten(0, (-1, s)).transpose(0, 1)


def _segments_to_rows(x):
    """[S, B, ...] -> [B*S, ...]."""
    return x.transpose(0, 1).flatten(0, 1)


# ----------------------------------------------------------------------------- fused path
class FusedLASP2(torch.autograd.Function):
    """apply(q, k, v, g, gk, starts, scale, chunk_size, segments) -> o, on rows = local
    segments: q, k [B*S, C/S, H, Dk], v [B*S, C/S, H, Dv], starts [B*S, C/S] bool (global
    document starts). A row whose token 0 starts a document ignores its S_in: rather than a
    reset at token 0 (which would put the whole batch on the op's document-mask path), its
    transfer, S_in and dL/dS_in are zeroed here. See the module docstring."""

    @staticmethod
    def forward(fctx, q, k, v, g, gk, starts, scale, chunk_size, segs):
        b, s, h, dk, dv = q.shape[0] // len(segs.mine), len(segs.mine), q.shape[2], q.shape[3], v.shape[3]
        keep = ~starts[:, 0]  # [B*S] the row takes S_in
        resets = starts.clone()
        resets[:, 0] = False
        late = {}

        def incoming(m, transfer):  # [B*S, H, Dk, Dv], [B*S, H, Dk]
            transfer = transfer * keep[:, None, None]
            pending = segs.gather_async(_pack(_rows_to_segments(m, s), _rows_to_segments(transfer, s)))

            def wait():
                m_all, transfer_all = _unpack(segs.ordered(pending.wait()), b, h, dk, dv)
                s_in = scan_segment_states(m_all, transfer_all)  # [P*S, B,H,Dk,Dv]
                s_in = _segments_to_rows(s_in[segs.mine]) * keep[:, None, None, None]
                late.update(s_in=s_in, transfer=transfer_all)
                return s_in

            return wait

        o, _ = linear_attention_fwd(q, k, v, g, gk, scale, None, resets, chunk_size, incoming=incoming)
        fctx.save_for_backward(q, k, v, g, gk, resets, keep, late["s_in"], late["transfer"])
        fctx.scale, fctx.chunk_size, fctx.segs = scale, chunk_size, segs
        return o

    @staticmethod
    def backward(fctx, do):
        q, k, v, g, gk, resets, keep, s_in, transfer_all = fctx.saved_tensors
        segs, s = fctx.segs, len(fctx.segs.mine)

        def outgoing(ds_in):  # [B*S, H, Dk, Dv]
            ds_in = ds_in * keep[:, None, None, None]
            pending = segs.gather_async(_rows_to_segments(ds_in, s).flatten(1))

            def wait():
                ds_all = segs.ordered(pending.wait()).unflatten(1, (-1, *ds_in.shape[1:]))  # [P*S, B,H,Dk,Dv]
                return _segments_to_rows(scan_segment_grads(ds_all, transfer_all)[segs.mine])

            return wait

        dq, dk, dv, dg, dgk, _ = linear_attention_bwd(
            q, k, v, g, gk, fctx.scale, s_in, resets, fctx.chunk_size, do, outgoing=outgoing
        )
        return dq, dk, dv, dg, dgk, None, None, None, None


# ----------------------------------------------------------------------------- generic path
class GatherSummaries(torch.autograd.Function):
    """packed [S, n] on this rank -> gathered [P, S, n], from a ``comm.all_gather_async`` of
    packed.detach() already in flight. Backward: one reduce-scatter of d(gathered)."""

    @staticmethod
    def forward(fctx, packed, pending, group):
        fctx.group = group
        return pending.wait()

    @staticmethod
    def backward(fctx, grad):
        return comm.reduce_scatter(list(grad.unbind(0)), fctx.group), None, None


# ----------------------------------------------------------------------------- strategy
@register("lasp2", default="linear")
class LASP2(LinearStrategy):
    """Linear attention under CP with one all-gather of segment states per layer (LASP-2);
    any layout. Softmax attention is not provided (pair it with allgather: LASP-2H).

    recompute (default True; generic path only -- the fused path keeps just the layer inputs
    and the incoming states): keep only the layer inputs for backward and recompute the
    segment summaries and the incoming-state term there (about 2x less saved memory than
    keeping their intermediates, for a little extra backward compute)."""

    layouts = ("contiguous", "zigzag")

    Options = LASPOptions

    def linear_attention(self, q, k, v, ctx, *, g=None, gk=None, scale=1.0, chunk_size=64, impl="auto"):
        """q, k [B, C, H, Dk], v [B, C, H, Dv], g [B, C, H], gk [B, C, H, Dk] -> o [B, C, H, Dv],
        exact against the single-device op on the whole row."""
        starts = ctx.docs.starts.to(q.device)  # [B, C]
        segs = Segments(ctx)
        if runs_torch_chunk(impl, q):
            n = len(segs.mine)  # rows = segments: [B, C, ...] -> [B*S, C/S, ...] (a view for S = 1)
            rows = [None if x is None else x.reshape(x.shape[0] * n, -1, *x.shape[2:]) for x in (q, k, v, g, gk)]
            o = FusedLASP2.apply(*rows, starts.reshape(-1, starts.shape[1] // n), float(scale), int(chunk_size), segs)
            return o.reshape(*q.shape[:3], v.shape[3])
        return self._generic(q, k, v, g, gk, scale, chunk_size, impl, starts, ctx, segs)

    def _generic(self, q, k, v, g, gk, scale, chunk_size, impl, starts, ctx, segs):
        b, _, h, dk = q.shape
        dv = v.shape[-1]
        local = local_segments(ctx)

        # 1. segment summaries -> all-gather in flight
        packed = []
        for _, sl in local:
            m, big_g, has = summarize(k[:, sl], v[:, sl], cut(g, sl), cut(gk, sl), starts[:, sl], self.recompute)
            packed.append(_pack(m[None], segment_transfer(big_g, has)[None]))
        packed = torch.cat(packed)  # [S, n]
        pending = segs.gather_async(packed)

        # 2. intra-segment part, overlapped with the gather
        resets = starts.clone()
        for _, sl in local:
            resets[:, sl.start] = True
        o = intra_linear_attention(q, k, v, g, gk, scale, resets, chunk_size, impl)

        # 3. exclusive scan over all segments in global order
        gathered = GatherSummaries.apply(packed, pending, ctx.group)  # [P, S, n]
        s_in = scan_segment_states(*_unpack(segs.ordered(gathered), b, h, dk, dv))  # [P*S, B,H,Dk,Dv]

        # 4. incoming-state term of each local segment
        out = []
        for j, sl in local:
            inter = state_term(q[:, sl], s_in[j], cut(g, sl), cut(gk, sl), starts[:, sl], scale, self.recompute)
            out.append((o[:, sl].to(inter.dtype) + inter).to(o.dtype))
        return torch.cat(out, dim=1)

    def forward_bytes(self, shape: LayerShape) -> int:
        """(P-1) * S * (B*H*Dk*Dv + B*H*Dk) * s (module docstring); H = n_heads (linear
        mixers have no GQA), Dv = head_dim, Dk = key_dim or head_dim. Flat in seq_len."""
        s = shape
        dk = s.key_dim or s.head_dim
        segments = 2 if s.layout == "zigzag" else 1
        per_segment = s.batch * s.n_heads * dk * s.head_dim + s.batch * s.n_heads * dk
        return (s.cp - 1) * segments * per_segment * state_bytes(s.elem_bytes)
