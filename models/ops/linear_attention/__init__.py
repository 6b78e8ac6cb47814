"""(Gated) linear attention ops: chunked fast path, token-by-token reference, fla dispatch.

    naive.recurrent_linear_attention_ref   reference recurrence (autograd)
    chunk.chunk_linear_attention           chunked forward + hand-written chunked backward
    chunk.linear_attention_fwd / _bwd      forward and backward; their ``incoming`` /
                                           ``outgoing`` hooks let LASP-2 overlap its
                                           collectives with the local work (hand-written)
    segments.segment_state / segment_transfer / scan_segment_states / scan_segment_grads /
             segment_output_from_state     the segment summaries LASP needs (autograd)
    fla_backend                            fla Triton kernels on CUDA when importable
    interface.linear_attention             the entry point for mixers / contexts (cu_seqlens)
Document boundaries come as ``cu_seqlens`` (models/ops/documents.py converts every other form).
``impl`` names the implementation everywhere (``model.linear_impl``): "auto", "chunk", "naive".

LASP-2 on rank r (contiguous segment, global doc starts ``starts`` [B, C] incl. token 0):
    M, G, f = segment_state(k, v, g, gk, starts)             # all-gather (M, transfer)
    transfer = segment_transfer(G, f)
    S_in = scan_segment_states(Ms, transfers)[r] * ~starts[:, 0]   # (broadcast over H, Dk, Dv)
    o, _ = chunk_linear_attention(q, k, v, g, gk, scale, initial_state=S_in,
                                  cu_seqlens=cu_seqlens_from_starts(starts))
Backward: autograd through the op gives dL/dS_in; the scan's (reverse) backward turns the
gathered dS_in into dL/dM_j, dL/dG_j. parallel/strategies/lasp2.py does the same with one op
call per layer: ``linear_attention_fwd(..., incoming=)`` hands out (M, transfer) from its own
chunk scan and takes S_in late; ``linear_attention_bwd(..., outgoing=)`` hands out dL/dS_in and
takes dL/dS_end (``scan_segment_grads``) late.
"""

from models.ops.linear_attention.chunk import (
    ChunkLinearAttentionFunction,
    chunk_linear_attention,
    linear_attention_bwd,
    linear_attention_fwd,
)
from models.ops.linear_attention.interface import IMPLS, check_impl, linear_attention, runs_torch_chunk
from models.ops.linear_attention.naive import recurrent_linear_attention_ref
from models.ops.linear_attention.segments import (
    scan_segment_grads,
    scan_segment_states,
    segment_output_from_state,
    segment_state,
    segment_transfer,
)

__all__ = [
    "IMPLS",
    "ChunkLinearAttentionFunction",
    "check_impl",
    "chunk_linear_attention",
    "linear_attention",
    "linear_attention_fwd",
    "linear_attention_bwd",
    "segment_state",
    "segment_transfer",
    "scan_segment_states",
    "scan_segment_grads",
    "segment_output_from_state",
    "recurrent_linear_attention_ref",
    "runs_torch_chunk",
]
