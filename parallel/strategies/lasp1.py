"""LASP-1-style baseline: the carried linear-attention state travels rank to rank.

Shapes (local shards; P = CP world size, C = tokens per rank):
    q, k   [B, C, H, Dk]   v, o [B, C, H, Dv]   g [B, C, H]   gk [B, C, H, Dk]
    M      [B, H, Dk, Dv]  this rank's end state for a zero incoming state (fp32; fp64 for fp64)
    G      [B, H, Dk]      its total log-decay;  S_in, S_out [B, H, Dk, Dv]

Contiguous layout only (rank r holds the r-th segment, so the chain follows the ranks).
Forward on rank r: summaries and the intra part as in LASP-2 (lasp2.py), then
    S_in(r)  = receive from r-1   (0 on rank 0; zeroed if token 0 starts a document)
    S_out(r) = [no document start on r] exp(G_r) S_in(r) + M_r  -> send to r+1
P-1 sequential hops; o += the S_in term. Backward runs the chain in reverse: rank r receives
dL/dS_out(r) = dL/dS_in(r+1) from r+1, which is dL/dM_r; it derives dL/dG_r and sends
dL/dS_in(r) (its own term plus the carried part) to r-1.
Bytes received per rank per layer in forward: B*H*Dk*Dv*s on ranks 1..P-1, 0 on rank 0
(s = 4, 8 for fp64 inputs); the chain's latency, not its volume, grows with P.
"""

from __future__ import annotations

import torch

from parallel import comm
from parallel.strategies.base import LASPOptions, LayerShape, LinearStrategy, register
from parallel.strategies.lasp_common import intra_linear_attention, state_bytes, state_term, summarize


class RingStatePass(torch.autograd.Function):
    """(M, G, has_start [B], first_is_start [B]) of this rank -> S_in [B, H, Dk, Dv]."""

    @staticmethod
    def forward(fctx, m, big_g, has_start, first_is_start, group, rank, world):
        s_recv = torch.zeros_like(m)
        if rank > 0:
            comm.p2p(group, recv=s_recv, src=rank - 1)
        carry = torch.exp(big_g)[..., None] * (~has_start)[:, None, None, None]  # [B,H,Dk,1]
        if rank < world - 1:
            comm.p2p(group, send=carry * s_recv + m, dst=rank + 1)
        keep = (~first_is_start)[:, None, None, None]
        fctx.save_for_backward(s_recv, carry, keep)
        fctx.group, fctx.rank, fctx.world = group, rank, world
        return s_recv * keep

    @staticmethod
    def backward(fctx, ds_in):
        s_recv, carry, keep = fctx.saved_tensors
        ds_out = torch.zeros_like(s_recv)
        if fctx.rank < fctx.world - 1:
            comm.p2p(fctx.group, recv=ds_out, src=fctx.rank + 1)
        if fctx.rank > 0:
            comm.p2p(fctx.group, send=ds_in * keep + carry * ds_out, dst=fctx.rank - 1)
        d_g = (carry * s_recv * ds_out).sum(-1)  # [B, H, Dk]
        return ds_out, d_g, None, None, None, None, None


@register("lasp1")
class LASP1(LinearStrategy):
    """Linear attention under CP with the state passed along the ranks (P-1 sequential hops).
    recompute: as in LASP2."""

    layouts = ("contiguous",)

    Options = LASPOptions

    def linear_attention(self, q, k, v, ctx, *, g=None, gk=None, scale=1.0, chunk_size=64, impl="auto"):
        """q, k [B, C, H, Dk], v [B, C, H, Dv], g [B, C, H], gk [B, C, H, Dk] -> o [B, C, H, Dv]."""
        if ctx.layout not in self.layouts:
            raise ValueError(
                f"parallel.cp.layout={ctx.layout!r} is not supported by strategy "
                f"'lasp1' (the state chain follows contiguous segments): set "
                f"parallel.cp.layout=contiguous or use lasp2"
            )
        starts = ctx.docs.starts.to(q.device)  # [B, C]
        m, big_g, has = summarize(k, v, g, gk, starts, self.recompute)
        o = intra_linear_attention(q, k, v, g, gk, scale, starts, chunk_size, impl)
        s_in = RingStatePass.apply(m, big_g, has, starts[:, 0], ctx.group, ctx.rank, ctx.world_size)
        inter = state_term(q, s_in, g, gk, starts, scale, self.recompute)
        return (o.to(inter.dtype) + inter).to(o.dtype)

    def forward_bytes(self, shape: LayerShape) -> int:
        """B*H*Dk*Dv*s, what ranks 1..P-1 receive (rank 0 receives nothing); 0 for P = 1."""
        s = shape
        if s.cp == 1:
            return 0
        return s.batch * s.n_heads * (s.key_dim or s.head_dim) * s.head_dim * state_bytes(s.elem_bytes)
