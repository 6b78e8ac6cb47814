"""Chunked (gated) linear attention with a hand-written chunked backward, in plain PyTorch.

Shapes (one layout everywhere):
    q, k          [B, T, H, Dk]
    v             [B, T, H, Dv]
    g             [B, T, H]       scalar log-decay per head, <= 0 (optional)
    gk            [B, T, H, Dk]   per-key log-decay (GLA), <= 0 (optional; adds to g)
    initial_state [B, H, Dk, Dv]  state entering each row's first document (optional)
    cu_seqlens    [n_docs + 1]    document starts over the flattened [B * T] batch, ends at B * T
    o             [B, T, H, Dv]   in q's dtype
    final_state   [B, H, Dk, Dv]  fp32 (fp64 for fp64 inputs), state after each row's last token
Inside: chunks of C tokens, tensors [B, H, NC, C, ...]; a = g (+ gk) the log-decay, b its
cumulative sum inside a chunk, states S [B, H, NC, Dk, Dv] in fp32 (fp64 for fp64 inputs).

Same recurrence as ``naive.recurrent_linear_attention_ref``: per chunk,
    o_t = sum_{s <= t, same doc} (q_t . (exp(b_t - b_s) * k_s)) v_s
          + [t in the chunk's first doc] (exp(b_t) q_t) S_in
    S_out = [no doc start in chunk] exp(b_C) S_in + sum_{s in last doc} exp(b_C - b_s) k_s^T v_s
Decay factors are exponentials of masked differences b_t - b_s (s <= t, same document), so they
never exceed 1 and g = 0 or g = -30 stay finite. T need not be a multiple of C (zero padding:
q = k = v = 0 and a = 0 leave outputs and states unchanged).

Backward (``linear_attention_bwd``) recomputes the chunk states, runs the reverse state scan
dS_in = exp(b_C) dS_out + sum_t exp(b_t) q_t^T dO_t, and the log-decay gradient from
db_t = q_t * dq_t - k_t * dk_t (+ rowsum(S_out * dS_out) at the chunk end), da = reverse cumsum of
db inside the chunk.

LASP-2 pieces (sequence parallelism over CP ranks, each holding one contiguous segment):
``segment_state`` (M, G, has_start per rank, to all-gather), ``scan_segment_states`` (the
exclusive scan giving each rank's S_in), and ``chunk_linear_attention(..., initial_state=S_in)``
whose backward returns dL/dS_in; ``segment_output_from_state`` is the S_in term on its own.
"""

from __future__ import annotations

import functools

import torch

from models.ops.documents import resets_from_cu_seqlens
from models.ops.linear_attention.naive import acc_dtype

PAIRWISE_BUDGET = 1 << 24  # elements of one per-key decay block [B, H, n, C, C, Dk]
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- layout helpers
def _chunked(x: torch.Tensor, c: int, scale: float | None = None) -> torch.Tensor:
    """[B, T, H, ...] -> [B, H, NC, C, ...] (times ``scale`` if given), zero-padded along T:
    a new contiguous tensor, so that the batched matmuls over (B, H, NC) never copy it again."""
    b, t = x.shape[:2]
    nc = -(-t // c)
    x = x.transpose(1, 2)
    if nc * c > t:
        x = torch.cat([x, x.new_zeros(*x.shape[:2], nc * c - t, *x.shape[3:])], dim=2)
    x = x.reshape(*x.shape[:2], nc, c, *x.shape[3:])
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return torch.mul(x, scale, out=out) if scale is not None else out.copy_(x)


def _mm_add(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float = 1.0):
    """scale * (acc + a @ b) in one batched call (no separate add pass): acc [..., m, n],
    a [..., m, k], b [..., k, n] with the same leading dims."""
    m, n, k = acc.shape[-2], acc.shape[-1], a.shape[-1]
    out = torch.baddbmm(acc.reshape(-1, m, n), a.reshape(-1, m, k), b.reshape(-1, k, n), beta=scale, alpha=scale)
    return out.view(acc.shape)


def _unchunked(x: torch.Tensor, t: int) -> torch.Tensor:
    """[B, H, NC, C, ...] -> [B, T, H, ...] (drops the padding)."""
    x = x.reshape(*x.shape[:2], -1, *x.shape[4:])[:, :, :t]
    return x.transpose(1, 2)


class _Docs:
    """Per-chunk document masks from reset flags [B, NC, C], as [B, 1, NC, ...] (broadcast
    over H)."""

    def __init__(self, resets: torch.Tensor):
        self.seg = seg = resets.long().cumsum(-1)  # doc index inside chunk
        self.first = (seg == 0)[:, None, ..., None]  # [B,1,NC,C,1] sees S_in
        self.last = (seg == seg[..., -1:])[:, None, ..., None]  # [B,1,NC,C,1] feeds S_out
        self.carry = (~resets.any(-1))[:, None, :, None]  # [B,1,NC,1] S_in passes
        self.any_reset = bool(resets.any())

    @functools.cached_property
    def pair(self) -> torch.Tensor:
        """[B,1,NC,C,C] same document and s <= t (built on first use)."""
        seg = self.seg
        c = seg.shape[-1]
        causal = torch.ones(c, c, dtype=torch.bool, device=seg.device).tril()
        return ((seg[..., :, None] == seg[..., None, :]) & causal)[:, None]


def _slices(n: int, per_chunk: int):
    step = max(1, PAIRWISE_BUDGET // max(1, per_chunk))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _pair_decay(b: torch.Tensor, pair: torch.Tensor, per_key: bool) -> torch.Tensor:
    """exp(b_t - b_s) on allowed pairs, 0 elsewhere: [B,H,n,C,C] (scalar) or [B,H,n,C,C,Dk]."""
    if not per_key:
        b = b[..., 0]
        return torch.exp((b[..., :, None] - b[..., None, :]).masked_fill(~pair, NEG_INF))
    diff = b[..., :, None, :] - b[..., None, :, :]
    return torch.exp(diff.masked_fill(~pair[..., None], NEG_INF))


def _intra_scores(q, k, b, pair, per_key):
    """A [B, H, NC, C, C] = sum_d q_td k_sd exp(b_td - b_sd) on same-document pairs s <= t."""
    if not per_key:
        return (q @ k.transpose(-1, -2)) * _pair_decay(b, pair, False)
    out = []
    for sl in _slices(q.shape[2], q.shape[0] * q.shape[1] * q.shape[3] ** 2 * q.shape[4]):
        e = _pair_decay(b[:, :, sl], pair[:, :, sl], True)
        out.append(torch.einsum("bhntd,bhnsd,bhntsd->bhnts", q[:, :, sl], k[:, :, sl], e))
    return torch.cat(out, dim=2)


def _intra_grads(q, k, b, pair, da, per_key):
    """Gradients of sum(dA * A) wrt q and k: ([B,H,NC,C,Dk], [B,H,NC,C,Dk])."""
    if not per_key:
        p = da * _pair_decay(b, pair, False)
        return p @ k, p.transpose(-1, -2) @ q
    dq, dk = [], []
    for sl in _slices(q.shape[2], q.shape[0] * q.shape[1] * q.shape[3] ** 2 * q.shape[4]):
        e = _pair_decay(b[:, :, sl], pair[:, :, sl], True)
        dq.append(torch.einsum("bhnts,bhntsd,bhnsd->bhntd", da[:, :, sl], e, k[:, :, sl]))
        dk.append(torch.einsum("bhnts,bhntsd,bhntd->bhnsd", da[:, :, sl], e, q[:, :, sl]))
    return torch.cat(dq, dim=2), torch.cat(dk, dim=2)


# ----------------------------------------------------------------------------- state scan
def _chunk_summaries(k, v, b, docs):
    """w [B,H,NC,C,Dk|1] decay to chunk end (last doc only), M [B,H,NC,Dk,Dv] local states,
    gam [B,H,NC,Dk|1] decay of S_in across the chunk (0 when the chunk holds a doc start)."""
    b_end = b[..., -1:, :]
    w = torch.exp((b_end - b).masked_fill(~docs.last, NEG_INF))
    m = (k * w).transpose(-1, -2) @ v
    gam = torch.exp(b_end[..., 0, :]) * docs.carry
    return w, m, gam


def _scan_states(m, gam, s0):
    """S_in of every chunk [B, H, NC, Dk, Dv] and the state after the last chunk, written
    chunk by chunk into one buffer (one fused multiply-add per chunk, no stacking)."""
    nc = m.shape[2]
    s_in = torch.empty_like(m)
    s_in[:, :, 0] = s0
    for n in range(nc - 1):
        torch.addcmul(m[:, :, n], gam[:, :, n, :, None], s_in[:, :, n], out=s_in[:, :, n + 1])
    return s_in, torch.addcmul(m[:, :, -1], gam[:, :, -1, :, None], s_in[:, :, -1])


def _scan_grads(dqs, gam, ds_final):
    """Reverse scan. dqs [B,H,NC,Dk,Dv] = sum_t (exp(b_t) q_t)^T dO_t per chunk.
    Returns dL/dS_out of every chunk [B, H, NC, Dk, Dv] and dL/dS_in of the first chunk."""
    nc = dqs.shape[2]
    outs = torch.empty_like(dqs)
    outs[:, :, -1] = ds_final
    for n in range(nc - 1, 0, -1):
        torch.addcmul(dqs[:, :, n], gam[:, :, n, :, None], outs[:, :, n], out=outs[:, :, n - 1])
    return outs, torch.addcmul(dqs[:, :, 0], gam[:, :, 0, :, None], outs[:, :, 0])


def _carry_step(m_n, s_n, carry_n, all_n, none_n, out):
    """out = carry_n * s_n + m_n for carry_n [B] bool in {0, 1}: an add, a copy, or both."""
    if all_n:
        return torch.add(m_n, s_n, out=out)
    if none_n:
        return out.copy_(m_n) if out is not None else m_n.clone()
    res = m_n + s_n * carry_n[:, None, None, None]
    return res if out is None else out.copy_(res)


def _scan_plain(m, carry, s0):
    """The scan without decay: S_in[n+1] = carry_n S_in[n] + M_n, S_in[0] = s0, with carry in
    {0, 1}: one add (or a copy at a document start) per chunk into one buffer, no multiplies.
    m [B,H,NC,Dk,Dv], carry [B,NC] bool, s0 [B,H,Dk,Dv] -> (S_in [B,H,NC,Dk,Dv], final state).
    (torch.cumsum along the chunk dim computes the same sums but measured ~10x slower here.)"""
    nc = m.shape[2]
    all_c, none_c = carry.all(0).tolist(), (~carry).all(0).tolist()
    s_in = torch.empty_like(m)
    s_in[:, :, 0] = s0
    for n in range(nc - 1):
        _carry_step(m[:, :, n], s_in[:, :, n], carry[:, n], all_c[n], none_c[n], s_in[:, :, n + 1])
    return s_in, _carry_step(m[:, :, -1], s_in[:, :, -1], carry[:, -1], all_c[-1], none_c[-1], None)


def _scan_grads_plain(dqs, carry, ds_final):
    """Reverse of ``_scan_plain`` (see ``_scan_grads``): dL/dS_out of every chunk and dL/dS_in
    of the first chunk."""
    nc = dqs.shape[2]
    all_c, none_c = carry.all(0).tolist(), (~carry).all(0).tolist()
    outs = torch.empty_like(dqs)
    outs[:, :, -1] = ds_final
    for n in range(nc - 1, 0, -1):
        _carry_step(dqs[:, :, n], outs[:, :, n], carry[:, n], all_c[n], none_c[n], outs[:, :, n - 1])
    return outs, _carry_step(dqs[:, :, 0], outs[:, :, 0], carry[:, 0], all_c[0], none_c[0], None)


# ----------------------------------------------------------------------------- no decay
def _plain_parts(kc, vc, docs, s0):
    """Pieces shared by the decay-free forward and backward: the intra-chunk scores
    A [B,H,NC,C,C] (same document, s <= t), the key mask of the last document (None when
    no document starts in the row), the carry flags [B,NC] and S_in, S_final."""
    last = docs.last if docs.any_reset else None
    carry = docs.carry[:, 0, :, 0]
    m = (kc if last is None else kc * last).transpose(-1, -2) @ vc
    s_in, s_final = _scan_plain(m, carry, s0)
    return last, carry, s_in, s_final


def _hidden(docs, c: int, device) -> torch.Tensor:
    """Pairs to zero in the intra-chunk scores: other documents or the future,
    [B,1,NC,C,C], or just the future [C,C] when no document starts in the row."""
    if docs.any_reset:
        return ~docs.pair
    return torch.ones(c, c, dtype=torch.bool, device=device).triu(1)


def _plain_fwd(qc, kc, vc, docs, s0):
    """Forward without decay: o [B,H,NC,C,Dv] and the final state."""
    last, carry, s_in, s_final = _plain_parts(kc, vc, docs, s0)
    a = (qc @ kc.transpose(-1, -2)).masked_fill_(_hidden(docs, qc.shape[3], qc.device), 0.0)
    q_in = qc * docs.first if docs.any_reset else qc
    return _mm_add(q_in @ s_in, a, vc), s_final


def _plain_bwd(qc, kc, vc, docs, s0, doc_, ds_final, scale):
    """Backward without decay: (dq, dk, dv) [B,H,NC,C,D] and dL/dS_in of the first chunk.
    qc holds scale * q, so dq carries one more factor ``scale``."""
    last, carry, s_in, _ = _plain_parts(kc, vc, docs, s0)
    q_in = qc * docs.first if docs.any_reset else qc
    ds_out, ds0 = _scan_grads_plain(q_in.transpose(-1, -2) @ doc_, carry, ds_final)
    hidden = _hidden(docs, qc.shape[3], qc.device)
    a = (qc @ kc.transpose(-1, -2)).masked_fill_(hidden, 0.0)
    da = (doc_ @ vc.transpose(-1, -2)).masked_fill_(hidden, 0.0)
    k_out = kc if last is None else kc * last
    dv = _mm_add(k_out @ ds_out, a.transpose(-1, -2), doc_)
    dq_in, dk_out = doc_ @ s_in.transpose(-1, -2), vc @ ds_out.transpose(-1, -2)
    if docs.any_reset:
        dq_in, dk_out = dq_in * docs.first, dk_out * last
    return _mm_add(dq_in, da, kc, scale), _mm_add(dk_out, da.transpose(-1, -2), qc), dv, ds0


# ----------------------------------------------------------------------------- forward / backward
def _prepare(q, k, v, g, gk, initial_state, resets, scale, chunk_size):
    acc = acc_dtype(q)
    bsz, _, h, dk = q.shape
    per_key = gk is not None
    c = chunk_size
    if per_key:
        a = gk.to(acc) + (g.to(acc)[..., None] if g is not None else 0)
    elif g is not None:
        a = g.to(acc)
    b = None  # no decay: the plain path
    if g is not None or per_key:
        b = _chunked(a, c).cumsum(3)  # [B,H,NC,C(,Dk)]
        if not per_key:
            b = b[..., None]
    r = _chunked(resets[..., None], c)[:, 0]  # [B,NC,C] (padding: no reset)
    s0 = q.new_zeros(bsz, h, dk, v.shape[-1], dtype=acc) if initial_state is None else initial_state.to(acc)
    qc = _chunked(q.to(acc), c, scale)
    return qc, _chunked(k.to(acc), c), _chunked(v.to(acc), c), b, _Docs(r), s0, per_key


def linear_attention_fwd(q, k, v, g, gk, scale, initial_state, resets, chunk_size):
    """Forward without autograd. resets [B, T] bool (see segments.py).
    Returns (o [B,T,H,Dv] in q's dtype, final_state [B,H,Dk,Dv] fp32/fp64)."""
    qc, kc, vc, b, docs, s0, per_key = _prepare(q, k, v, g, gk, initial_state, resets, scale, chunk_size)
    if b is None:
        o, s_final = _plain_fwd(qc, kc, vc, docs, s0)
        return _unchunked(o, q.shape[1]).to(q.dtype), s_final
    w, m, gam = _chunk_summaries(kc, vc, b, docs)
    s_in, s_final = _scan_states(m, gam, s0)
    q_dec = qc * torch.exp(b) * docs.first
    o = _intra_scores(qc, kc, b, docs.pair, per_key) @ vc + q_dec @ s_in
    return _unchunked(o, q.shape[1]).to(q.dtype), s_final


def linear_attention_bwd(q, k, v, g, gk, scale, initial_state, resets, chunk_size, do, d_final=None):
    """Backward of ``linear_attention_fwd`` given dO [B,T,H,Dv] and dL/dfinal_state (or None).
    Returns (dq, dk, dv, dg or None, dgk or None, d_initial_state [B,H,Dk,Dv] or None)."""
    t = q.shape[1]
    qc, kc, vc, b, docs, s0, per_key = _prepare(q, k, v, g, gk, initial_state, resets, scale, chunk_size)
    doc_ = _chunked(do.to(qc.dtype), chunk_size)
    ds_final = torch.zeros_like(s0) if d_final is None else d_final.to(s0.dtype)
    d_init = None
    if b is None:
        dq, dk, dv, ds0 = _plain_bwd(qc, kc, vc, docs, s0, doc_, ds_final, scale)
        if initial_state is not None:
            d_init = ds0.to(initial_state.dtype)
        return (
            _unchunked(dq, t).to(q.dtype),
            _unchunked(dk, t).to(k.dtype),
            _unchunked(dv, t).to(v.dtype),
            None,
            None,
            d_init,
        )
    w, m, gam = _chunk_summaries(kc, vc, b, docs)
    s_in, s_final = _scan_states(m, gam, s0)
    dec_q = torch.exp(b) * docs.first
    ds_out, ds0 = _scan_grads((qc * dec_q).transpose(-1, -2) @ doc_, gam, ds_final)

    a_intra = _intra_scores(qc, kc, b, docs.pair, per_key)
    dq, dk = _intra_grads(qc, kc, b, docs.pair, doc_ @ vc.transpose(-1, -2), per_key)
    dv = a_intra.transpose(-1, -2) @ doc_ + (kc * w) @ ds_out
    dq = dq + (doc_ @ s_in.transpose(-1, -2)) * dec_q
    dk = dk + (vc @ ds_out.transpose(-1, -2)) * w

    db = qc * dq - kc * dk  # [B,H,NC,C,Dk]
    s_out = torch.cat([s_in[:, :, 1:], s_final[:, :, None]], dim=2)
    db[..., -1, :] += (s_out * ds_out).sum(-1)
    if not per_key:
        db = db.sum(-1)
    da = _unchunked(db.flip(3).cumsum(3).flip(3), t)  # [B,T,H(,Dk)]

    dg = dgk = None
    if gk is not None:
        dgk = da.to(gk.dtype)
        if g is not None:
            dg = da.sum(-1).to(g.dtype)
    elif g is not None:
        dg = da.to(g.dtype)
    if initial_state is not None:
        d_init = ds0.to(initial_state.dtype)
    return (
        _unchunked(dq * scale, t).to(q.dtype),
        _unchunked(dk, t).to(k.dtype),
        _unchunked(dv, t).to(v.dtype),
        dg,
        dgk,
        d_init,
    )


class ChunkLinearAttentionFunction(torch.autograd.Function):
    """apply(q, k, v, g, gk, initial_state, resets, scale, chunk_size) -> (o, final_state)."""

    @staticmethod
    def forward(ctx, q, k, v, g, gk, initial_state, resets, scale, chunk_size):
        ctx.save_for_backward(q, k, v, g, gk, initial_state, resets)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        return linear_attention_fwd(q, k, v, g, gk, scale, initial_state, resets, chunk_size)

    @staticmethod
    def backward(ctx, do, d_final):
        q, k, v, g, gk, initial_state, resets = ctx.saved_tensors
        grads = linear_attention_bwd(q, k, v, g, gk, ctx.scale, initial_state, resets, ctx.chunk_size, do, d_final)
        return (*grads, None, None, None)


def chunk_linear_attention(
    q,
    k,
    v,
    g=None,
    gk=None,
    scale: float = 1.0,
    initial_state=None,
    cu_seqlens=None,
    chunk_size: int = 64,
    output_final_state: bool = False,
    backend: str = "auto",
):
    """Chunked (gated) linear attention; shapes in the module docstring.

    ``initial_state`` enters the first document of each row only (document starts inside a row
    reset the state to 0); its gradient is returned by autograd, which is what LASP-2 needs.
    backend: "auto" (fla's Triton kernels for CUDA tensors when fla is importable, else torch),
    "torch", or "fla". Returns (o, final_state or None).
    """
    if backend not in ("auto", "torch", "fla"):
        raise ValueError(f"backend={backend!r}: choose auto, torch or fla")
    if backend == "fla" or (backend == "auto" and q.is_cuda):
        from models.ops.linear_attention import fla_backend

        if backend == "fla" or fla_backend.available():
            return fla_backend.fla_linear_attention(
                q, k, v, g, gk, scale, initial_state, cu_seqlens, output_final_state
            )
    bsz, t = q.shape[:2]
    resets = resets_from_cu_seqlens(cu_seqlens, bsz, t, q.device)
    o, final = ChunkLinearAttentionFunction.apply(q, k, v, g, gk, initial_state, resets, float(scale), int(chunk_size))
    return o, (final if output_final_state else None)


# ----------------------------------------------------------------------------- LASP-2 pieces
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


def scan_segment_states(m, big_g, has_start, first_is_start=None):
    """Exclusive scan over ranks after the all-gather: M [P,B,H,Dk,Dv], G [P,B,H,Dk],
    has_start [P,B], first_is_start [P,B] (rank's token 0 starts a document; its S_in is zeroed).
    Returns S_in [P,B,H,Dk,Dv] with S_in[0] = 0. Differentiable (autograd)."""
    s = torch.zeros_like(m[0])
    out = []
    for r in range(m.shape[0]):
        keep = None if first_is_start is None else ~first_is_start[r]
        out.append(s if keep is None else s * keep[:, None, None, None])
        carried = torch.exp(big_g[r])[..., None] * s * (~has_start[r])[:, None, None, None]
        s = carried + m[r]
    return torch.stack(out)


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
