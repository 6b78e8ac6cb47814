"""Segment summaries for sequence parallelism over linear attention (LASP-1 / LASP-2), as
differentiable pure math: parallel/strategies/lasp*.py communicate them, the tests check them
on one device against the whole-row op.

Shapes (one segment = the tokens one CP rank holds of a row, P segments in global order):
    k [B, T, H, Dk], v [B, T, H, Dv], g [B, T, H], gk [B, T, H, Dk], q [B, T, H, Dk]
    starts    [B, T] bool   document starts, *including* token 0 when the segment begins one
    M         [B, H, Dk, Dv] fp32/fp64   state at the segment end for a zero incoming state
    G         [B, H, Dk]    total log-decay of the segment
    transfer  [B, H, Dk]    exp(G), 0 in a row whose segment holds a document start
    S_in      [B, H, Dk, Dv] the state entering the segment: S_end = transfer * S_in + M

LASP-2 on rank r (``chunk_linear_attention`` with ``initial_state``, or the op's
``incoming`` hook, does the same in one call):
    M, G, f = segment_state(k, v, g, gk, starts)             # all-gather (M, transfer)
    S_in = scan_segment_states(Ms, transfers)[r]
    o = intra-segment op (state reset at every start) + segment_output_from_state(q, S_in, ...)
"""

from __future__ import annotations

import torch

from models.ops.common import acc_dtype

NEG_INF = float("-inf")


def _log_decay(g, gk, like):
    acc = acc_dtype(like)
    if gk is not None:
        return gk.to(acc) + (g.to(acc)[..., None] if g is not None else 0)
    if g is not None:
        return g.to(acc)[..., None]
    return like.new_zeros(*like.shape[:3], 1, dtype=acc)


def segment_state(k, v, g=None, gk=None, starts=None):
    """Summary of one segment (a CP rank's contiguous tokens) for the LASP-2 all-gather.

    k [B,T,H,Dk], v [B,T,H,Dv], g [B,T,H], gk [B,T,H,Dk]; starts [B,T] bool marks document starts
    *including* token 0 when the segment begins a document (None: no start in the segment).
    Returns
        M          [B,H,Dk,Dv]  sum_{t in last doc} exp(G - b_t) k_t^T v_t  (state at the segment
                                end for a zero incoming state), fp32 (fp64 for fp64 inputs)
        G          [B,H,Dk]     total log-decay of the segment, sum_t (g_t + gk_t)
        has_start  [B] bool     the segment holds a document start
    so that S_end = (0 if has_start else exp(G) * S_in) + M. Differentiable (autograd).
    """
    bsz, t, h, dk = k.shape
    a = _log_decay(g, gk, k)  # [B,T,H,Dk|1]
    suffix = a.flip(1).cumsum(1).flip(1)  # sum_{u >= t} a_u
    after = torch.cat([suffix[:, 1:], torch.zeros_like(suffix[:, :1])], dim=1)  # sum_{u > t}
    if starts is None:
        starts = torch.zeros(bsz, t, dtype=torch.bool, device=k.device)
    seg = starts.long().cumsum(1)
    last = (seg == seg[:, -1:])[:, :, None, None]
    w = torch.exp(after.masked_fill(~last, NEG_INF))
    m = torch.einsum("bthk,bthv->bhkv", k.to(a.dtype) * w, v.to(a.dtype))
    return m, suffix[:, 0].expand(bsz, h, dk), starts.any(1)


def segment_transfer(big_g, has_start):
    """How a segment carries its incoming state to its end: exp(G) [B,H,Dk], 0 in a row whose
    segment holds a document start (token 0 included) -- S_end = transfer * S_in + M."""
    return torch.exp(big_g) * (~has_start)[:, None, None]


def scan_segment_states(m, transfer):
    """Exclusive scan over the segments in global order after the all-gather: M [P,B,H,Dk,Dv],
    transfer [P,B,H,Dk] (``segment_transfer``). Returns S_in [P,B,H,Dk,Dv], S_in[0] = 0,
    S_in[j+1] = transfer[j] * S_in[j] + M[j]. A segment whose token 0 starts a document ignores
    its S_in (the op's reset at token 0). Differentiable (autograd)."""
    s = torch.zeros_like(m[0])
    out = []
    for j in range(m.shape[0]):
        out.append(s)
        s = transfer[j][..., None] * s + m[j]
    return torch.stack(out)


def scan_segment_grads(ds_in, transfer):
    """Reverse of ``scan_segment_states`` for a hand-written backward: ds_in [P,B,H,Dk,Dv] the
    gradient of each segment's own outputs wrt its S_in -> dL/dS_end of every segment
    [P,B,H,Dk,Dv] (= dL/dS_in of the next segment in total; 0 for the last)."""
    d = torch.zeros_like(ds_in[0])
    out = []
    for j in range(ds_in.shape[0] - 1, -1, -1):
        out.append(d)
        d = ds_in[j] + transfer[j][..., None] * d
    return torch.stack(out[::-1])


def segment_output_from_state(q, s_in, g=None, gk=None, starts=None, scale: float = 1.0):
    """The incoming-state term alone: o_t = scale * exp(b_t) q_t S_in for tokens before the
    segment's first document start (none if token 0 is a start). q [B,T,H,Dk], s_in [B,H,Dk,Dv]
    -> [B,T,H,Dv] (fp32/fp64). b_t = inclusive cumsum of the log-decay. Differentiable."""
    a = _log_decay(g, gk, q)
    first = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)
    if starts is not None:
        first = starts.long().cumsum(1) == 0
    qd = q.to(a.dtype) * torch.exp(a.cumsum(1)) * first[:, :, None, None]
    return scale * torch.einsum("bthk,bhkv->bthv", qd, s_in.to(a.dtype))
