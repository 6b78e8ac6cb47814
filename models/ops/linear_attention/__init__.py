"""(Gated) linear attention ops: chunked fast path, token-by-token reference, fla dispatch.

    naive.recurrent_linear_attention_ref   reference recurrence (autograd)
    chunk.chunk_linear_attention           chunked forward + hand-written chunked backward
    chunk.segment_state / scan_segment_states / segment_output_from_state
                                           the pieces a LASP-2 strategy needs
    fla_backend                            fla Triton kernels on CUDA when importable
    interface.linear_attention             the entry point for mixers / contexts (cu_seqlens)
Document boundaries come as ``cu_seqlens`` (models/ops/documents.py converts every other form).

LASP-2 on rank r (contiguous segment, global doc starts ``starts`` [B, C] incl. token 0):
    M, G, f = segment_state(k, v, g, gk, starts)             # all-gather (M, G, f, starts[:, 0])
    S_in = scan_segment_states(Ms, Gs, fs, firsts)[r]
    o, _ = chunk_linear_attention(q, k, v, g, gk, scale, initial_state=S_in,
                                  cu_seqlens=cu_seqlens_from_starts(starts))
Backward: autograd through the op gives dL/dS_in; the scan's (reverse) backward turns the
gathered dS_in into dL/dM_j, dL/dG_j (a reduce-scatter of those grads in a hand-written version).
"""

from models.ops.linear_attention.chunk import (
    ChunkLinearAttentionFunction,
    chunk_linear_attention,
    linear_attention_bwd,
    linear_attention_fwd,
    scan_segment_states,
    segment_output_from_state,
    segment_state,
)
from models.ops.linear_attention.interface import IMPLS, check_impl, linear_attention
from models.ops.linear_attention.naive import recurrent_linear_attention_ref

__all__ = [
    "IMPLS",
    "ChunkLinearAttentionFunction",
    "check_impl",
    "chunk_linear_attention",
    "linear_attention",
    "linear_attention_fwd",
    "linear_attention_bwd",
    "segment_state",
    "scan_segment_states",
    "segment_output_from_state",
    "recurrent_linear_attention_ref",
]
