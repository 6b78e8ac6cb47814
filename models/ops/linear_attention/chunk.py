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
db inside the chunk. Both directions build the scalar pair decay exp(b_t - b_s) once (in
place) and accumulate matmuls into their outputs (baddbmm_), so every pass over [C, C] scores
or [C, D] tokens is one the math needs.

LASP-2 (sequence parallelism over CP ranks, each holding contiguous segments):
``linear_attention_fwd(..., incoming=)`` hands out each row's (M, transfer) from its own chunk
scan and takes the incoming state S_in after its intra-chunk work (it enters the chunk states
as S_in[n] += prod_{i<n} gam_i * S_in, no pass over the tokens); ``linear_attention_bwd(...,
outgoing=)`` hands out dL/dS_in and takes dL/dS_end after its intra-chunk gradients. A reset at
a row's token 0 (a segment that starts a document) makes the row ignore S_in. For other ops
(the reference, fla) the same summaries come from segments.py (differentiable, op-independent).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from models.ops.common import acc_dtype, no_autocast
from models.ops.documents import resets_from_cu_seqlens

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


def _mm_add_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """acc = scale * (acc + a @ b) in place, one batched call (no separate add pass):
    acc [..., m, n], a [..., m, k], b [..., k, n] with the same leading dims."""
    m, n, k = acc.shape[-2], acc.shape[-1], a.shape[-1]
    acc.view(-1, m, n).baddbmm_(a.reshape(-1, m, k), b.reshape(-1, k, n), beta=scale, alpha=scale)
    return acc


def _bmm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out = a @ b over the leading dims, written into the storage of ``out`` (a dead buffer
    reused: a fresh [C, C]-sized one costs as much in page faults as a pass over it)."""
    torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out=out.view(-1, *out.shape[-2:]))
    return out


def _unchunked(x: torch.Tensor, t: int) -> torch.Tensor:
    """[B, H, NC, C, ...] -> [B, T, H, ...] (drops the padding)."""
    x = x.reshape(*x.shape[:2], -1, *x.shape[4:])[:, :, :t]
    return x.transpose(1, 2)


class _Docs:
    """Per-chunk document masks from reset flags [B, NC, C], as [B, 1, NC, ...] (broadcast
    over H). A reset at token 0 is allowed: the row then ignores its initial state."""

    def __init__(self, resets: torch.Tensor, device=None):
        # the flags the Python control flow reads come from the resets as given: host-side
        # (CPU) resets cost no device-to-host sync; the masks live on ``device``
        carry = ~resets.any(-1)  # [B,NC] S_in passes the chunk
        self.any_reset = bool(resets.any())
        self.carry_flags = (carry.all(0).tolist(), (~carry).all(0).tolist())  # per chunk: every row / no row
        resets = resets.to(device) if device is not None else resets
        self.carry = carry.to(resets.device)
        self.seg = seg = resets.long().cumsum(-1)  # doc index inside chunk
        self.first = (seg == 0)[:, None, ..., None]  # [B,1,NC,C,1] sees S_in
        self.last = (seg == seg[..., -1:])[:, None, ..., None]  # [B,1,NC,C,1] feeds S_out

    @functools.cached_property
    def same_doc(self) -> torch.Tensor:
        """[B,1,NC,C,C] bool: t and s lie in the same document."""
        seg = self.seg
        return (seg[..., :, None] == seg[..., None, :])[:, None]

    def hide_(self, x: torch.Tensor) -> torch.Tensor:
        """Zero the pairs (t, s) of x [B,H,NC,C,C] that are in the future or in another document,
        in place. tril_ and a multiply by a 0/1 mask cost a fifth of masked_fill_ (measured), so
        x must be finite below the diagonal."""
        x = x.tril_()
        return x.mul_(self.same_doc.to(x.dtype)) if self.any_reset else x

    @functools.cached_property
    def pair(self) -> torch.Tensor:
        """[B,1,NC,C,C] same document and s <= t (the per-key path; built on first use)."""
        c = self.seg.shape[-1]
        return self.same_doc & torch.ones(c, c, dtype=torch.bool, device=self.seg.device).tril()


def _slices(n: int, per_chunk: int):
    step = max(1, PAIRWISE_BUDGET // max(1, per_chunk))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _scalar_decay(b: torch.Tensor, docs: _Docs) -> torch.Tensor:
    """exp(b_t - b_s) on same-document pairs s <= t, 0 elsewhere: [B,H,NC,C,C] from b
    [B,H,NC,C,1]. The differences are clamped at 0 before exp (the future's would overflow,
    and overflowing exp is slow), then hidden: four cheap passes, no masked_fill."""
    b = b[..., 0]
    diff = b[..., :, None] - b[..., None, :]
    return docs.hide_(diff.clamp_max_(0.0).exp_())


def _key_decay(b: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
    """exp(b_t - b_s) per key on allowed pairs: [B,H,n,C,C,Dk] from b [B,H,n,C,Dk]."""
    diff = b[..., :, None, :] - b[..., None, :, :]
    return diff.clamp_max_(0.0).exp_().mul_(pair[..., None].to(diff.dtype))


def _key_scores(q, k, b, pair):
    """A [B, H, NC, C, C] = sum_d q_td k_sd exp(b_td - b_sd) on same-document pairs s <= t,
    a few chunks at a time (the [.., C, C, Dk] decay block stays under PAIRWISE_BUDGET)."""
    out = []
    for sl in _slices(q.shape[2], q.shape[0] * q.shape[1] * q.shape[3] ** 2 * q.shape[4]):
        e = _key_decay(b[:, :, sl], pair[:, :, sl])
        out.append(torch.einsum("bhntd,bhnsd,bhntsd->bhnts", q[:, :, sl], k[:, :, sl], e))
    return torch.cat(out, dim=2)


def _key_grads(q, k, b, pair, da):
    """Gradients of sum(dA * A) (A of ``_key_scores``) wrt q and k: ([B,H,NC,C,Dk], same)."""
    dq, dk = [], []
    for sl in _slices(q.shape[2], q.shape[0] * q.shape[1] * q.shape[3] ** 2 * q.shape[4]):
        e = _key_decay(b[:, :, sl], pair[:, :, sl])
        dq.append(torch.einsum("bhnts,bhntsd,bhnsd->bhntd", da[:, :, sl], e, k[:, :, sl]))
        dk.append(torch.einsum("bhnts,bhntsd,bhntd->bhnsd", da[:, :, sl], e, q[:, :, sl]))
    return torch.cat(dq, dim=2), torch.cat(dk, dim=2)


# ----------------------------------------------------------------------------- state scan
def _scan(x, gam, s0, reverse: bool = False):
    """The exclusive scan over chunks, one fused multiply-add per chunk into one buffer.
    x [B,H,NC,Dk,Dv], gam [B,H,NC,Dk|1,1] (broadcast over Dv), s0 [B,H,Dk,Dv]. Forward:
        out[0] = s0, out[n+1] = gam[n] out[n] + x[n]; returns (out, gam[-1] out[-1] + x[-1])
    (S_in of every chunk and the final state); ``reverse`` runs the chunks backwards:
        out[-1] = s0, out[n-1] = gam[n] out[n] + x[n]; returns (out, gam[0] out[0] + x[0])
    (dL/dS_out of every chunk and dL/dS_in of the first). The per-chunk views come from one
    ``unbind`` (indexing inside the loop cost 3x more). torch.cumsum over the chunk dim and a
    blocked two-level scan were measured 2-5x slower at NC = 64-512."""
    out = torch.empty_like(x)
    xs, gs, outs = x.unbind(2), gam.unbind(2), out.unbind(2)
    if reverse:
        xs, gs, outs = xs[::-1], gs[::-1], outs[::-1]
    outs[0].copy_(s0)
    for n in range(len(xs) - 1):
        torch.addcmul(xs[n], gs[n], outs[n], out=outs[n + 1])
    return out, torch.addcmul(xs[-1], gs[-1], outs[-1])


def _carry_step(x_n, s_n, carry_n, all_n, none_n, out):
    """out = carry_n * s_n + x_n for carry_n [B] bool in {0, 1}: an add, a copy, or both."""
    if all_n:
        return torch.add(x_n, s_n, out=out)
    if none_n:
        return out.copy_(x_n) if out is not None else x_n.clone()
    res = x_n + s_n * carry_n[:, None, None, None]
    return res if out is None else out.copy_(res)


def _scan_plain(x, carry, s0, reverse: bool = False, flags=None):
    """``_scan`` without decay: gam = carry [B, NC] bool in {0, 1}, so one add (or a copy at a
    document start) per chunk, no multiplies. ``flags``: (all rows carry, no row carries) per
    chunk, precomputed on the host (``_Docs.carry_flags``)."""
    all_c, none_c = flags if flags is not None else (carry.all(0).tolist(), (~carry).all(0).tolist())
    out = torch.empty_like(x)
    steps = list(zip(x.unbind(2), carry.unbind(1), all_c, none_c))
    outs = out.unbind(2)
    if reverse:
        steps, outs = steps[::-1], outs[::-1]
    outs[0].copy_(s0)
    for n in range(len(steps) - 1):
        _carry_step(*steps[n][:1], outs[n], *steps[n][1:], outs[n + 1])
    return out, _carry_step(*steps[-1][:1], outs[-1], *steps[-1][1:], None)


def _reach(gam, reverse: bool = False):
    """How a state entering the row reaches each chunk: prod_{i < n} gam[i] ([B,H,NC,...],
    ``reverse``: prod_{i > n}), and the product over all chunks. Factors in [0, 1], no division."""
    ones = torch.ones_like(gam[:, :, :1])
    if reverse:
        p = gam.flip(2).cumprod(2).flip(2)
        return torch.cat([p[:, :, 1:], ones], dim=2), p[:, :, 0]
    p = gam.cumprod(2)
    return torch.cat([ones, p[:, :, :-1]], dim=2), p[:, :, -1]


# ----------------------------------------------------------------------------- forward / backward
class _States(NamedTuple):
    """What the chunk states need (``_Chunks.states``); None marks a factor of 1."""

    w: torch.Tensor | None  # [B,H,NC,C,Dk|1] how each key reaches its chunk end (last doc only, decayed)
    k_out: torch.Tensor  # [B,H,NC,C,Dk] kc * w
    gam: torch.Tensor | None  # [B,H,NC,Dk|1,1] how S_in crosses a chunk; None without decay (docs.carry)
    dec_q: torch.Tensor | None  # [B,H,NC,C,Dk|1] how each query reads S_in (first doc only, decayed)
    q_in: torch.Tensor  # [B,H,NC,C,Dk] qc * dec_q
    s_in: torch.Tensor  # [B,H,NC,Dk,Dv] state entering every chunk
    s_final: torch.Tensor  # [B,H,Dk,Dv] state after the last token


class _Chunks:
    """The op's inputs in chunks: qc (times scale), kc, vc [B,H,NC,C,D] in the state dtype,
    b [B,H,NC,C,Dk|1] the cumulative log-decay (None without decay: the plain path), docs, s0."""

    def __init__(self, q, k, v, g, gk, initial_state, resets, scale, chunk_size):
        acc = acc_dtype(q)
        bsz, self.t, h, dk = q.shape
        self.c, self.per_key = chunk_size, gk is not None
        self.b = None
        if gk is not None:
            a = gk.to(acc) + (g.to(acc)[..., None] if g is not None else 0)
            self.b = _chunked(a, chunk_size).cumsum(3)
        elif g is not None:
            self.b = _chunked(g.to(acc), chunk_size).cumsum(3)[..., None]
        self.docs = _Docs(_chunked(resets[..., None], chunk_size)[:, 0], q.device)  # [B,NC,C] (padding: no reset)
        s0 = initial_state
        self.s0 = q.new_zeros(bsz, h, dk, v.shape[-1], dtype=acc) if s0 is None else s0.to(acc)
        self.qc = _chunked(q.to(acc), chunk_size, scale)
        self.kc, self.vc = _chunked(k.to(acc), chunk_size), _chunked(v.to(acc), chunk_size)

    def states(self) -> _States:
        """Chunk summaries and the forward scan from s0 (see ``_States``)."""
        d = self.docs
        if self.b is None:
            w, gam, dec_q = (d.last, None, d.first) if d.any_reset else (None, None, None)
        else:
            b, b_end = self.b, self.b[..., -1:, :]
            w = b_end - b
            w = (w.masked_fill_(~d.last, NEG_INF) if d.any_reset else w).exp_()
            gam = torch.exp(b_end.transpose(-1, -2)) * d.carry[:, None, :, None, None]
            dec_q = torch.exp(b).mul_(d.first) if d.any_reset else torch.exp(b)
        k_out = self.times(self.kc, w)
        s_in, s_final = self.scan(k_out.transpose(-1, -2) @ self.vc, gam, self.s0)
        return _States(w, k_out, gam, dec_q, self.times(self.qc, dec_q), s_in, s_final)

    @staticmethod
    def times(x, factor):
        return x if factor is None else x * factor

    def gam_or_carry(self, gam):
        """gam as a float tensor (the plain path's carry flags as 0 / 1)."""
        return gam if gam is not None else self.docs.carry[:, None, :, None, None].to(self.s0.dtype)

    def scan(self, x, gam, s0, reverse: bool = False):
        if gam is None:
            return _scan_plain(x, self.docs.carry, s0, reverse, self.docs.carry_flags)
        return _scan(x, gam, s0, reverse)

    def scores(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Intra-chunk scores A [B,H,NC,C,C] (same document, s <= t, decayed) and the scalar
        pair decay [B,H,NC,C,C] they used (None without decay or with per-key decay)."""
        qc, kc, b = self.qc, self.kc, self.b
        if self.per_key:
            return _key_scores(qc, kc, b, self.docs.pair), None
        if b is None:
            return self.docs.hide_(qc @ kc.transpose(-1, -2)), None
        decay = _scalar_decay(b, self.docs)
        return (qc @ kc.transpose(-1, -2)).mul_(decay), decay


@no_autocast
def linear_attention_fwd(q, k, v, g, gk, scale, initial_state, resets, chunk_size, incoming=None):
    """Forward without autograd. resets [B, T] bool (models/ops/documents.py; a reset at token 0 makes
    the row ignore its initial state). Returns (o [B,T,H,Dv] in q's dtype, final_state
    [B,H,Dk,Dv] fp32/fp64).

    ``incoming`` (sequence parallelism, LASP-2): the initial state is not known yet. The op
    calls ``wait = incoming(m, transfer)`` as soon as the local chunk states are known, with
    m [B,H,Dk,Dv] the final state for a zero initial state and transfer [B,H,Dk] the factor
    that carries an initial state to the end (final = m + transfer * S_in; 0 in a row with a
    reset), then computes the intra-chunk part, then takes S_in = ``wait()`` [B,H,Dk,Dv]."""
    x = _Chunks(q, k, v, g, gk, initial_state, resets, scale, chunk_size)
    st = x.states()
    s_in, s_final = st.s_in, st.s_final
    if incoming is not None:
        reach, transfer = _reach(x.gam_or_carry(st.gam))
        wait = incoming(s_final, transfer[..., 0].expand(s_final.shape[:-1]))
    a, _ = x.scores()
    o = a @ x.vc
    if incoming is not None:
        s_inc = wait().to(s_in.dtype)[:, :, None]  # [B,H,1,Dk,Dv]
        s_in = s_in.addcmul_(reach, s_inc)
        s_final = s_final.addcmul(transfer, s_inc[:, :, 0])
    o = _mm_add_(o, st.q_in, s_in)
    return _unchunked(o, x.t).to(q.dtype), s_final


@no_autocast
def linear_attention_bwd(q, k, v, g, gk, scale, initial_state, resets, chunk_size, do, d_final=None, outgoing=None):
    """Backward of ``linear_attention_fwd`` given dO [B,T,H,Dv] and dL/dfinal_state (or None).
    Returns (dq, dk, dv, dg or None, dgk or None, d_initial_state [B,H,Dk,Dv] or None).

    ``outgoing`` (LASP-2): dL/dfinal_state is not known yet. The op calls
    ``wait = outgoing(ds_in)`` with ds_in [B,H,Dk,Dv] the gradient of the local outputs wrt
    the initial state, as early as it can, computes the intra-chunk gradients, then takes
    dL/dfinal_state = ``wait()`` [B,H,Dk,Dv] (d_final must be None)."""
    x = _Chunks(q, k, v, g, gk, initial_state, resets, scale, chunk_size)
    qc, kc, vc, b = x.qc, x.kc, x.vc, x.b
    doc_ = _chunked(do.to(qc.dtype), chunk_size)
    ds_final = torch.zeros_like(x.s0) if d_final is None else d_final.to(x.s0.dtype)
    st = x.states()
    w, gam, dec_q, s_in, s_final = st.w, st.gam, st.dec_q, st.s_in, st.s_final
    ds_out, ds0 = x.scan(st.q_in.transpose(-1, -2) @ doc_, gam, ds_final, reverse=True)
    if outgoing is not None:
        wait = outgoing(ds0)

    # intra-chunk gradients and the S_in term of dq (none of them needs dL/dS_out); dq is
    # scaled once here (qc holds scale * q): dq = scale * (dq_in * dec_q + da @ kc). From here
    # on, the chunked copies and the scores are overwritten in place once they are dead.
    a, decay = x.scores()
    dv = a.transpose(-1, -2) @ doc_
    da = _bmm_into(a, doc_, vc.transpose(-1, -2))  # a is dead
    dq = doc_ @ s_in.transpose(-1, -2)
    if dec_q is not None:
        dq = dq.mul_(dec_q)
    if x.per_key:
        dq_a, dk = _key_grads(qc, kc, b, x.docs.pair, da)
        dq = dq.add_(dq_a).mul_(scale)
    else:
        da = x.docs.hide_(da) if decay is None else da.mul_(decay)
        dq, dk = _mm_add_(dq, da, kc, scale), da.transpose(-1, -2) @ qc

    if outgoing is not None:
        reach, transfer = _reach(x.gam_or_carry(gam), reverse=True)
        ds_end = wait().to(ds_out.dtype)[:, :, None]  # [B,H,1,Dk,Dv]
        ds_out = ds_out.addcmul_(reach, ds_end)
        ds0 = ds0.addcmul(transfer, ds_end[:, :, 0])
    dv = _mm_add_(dv, st.k_out, ds_out)
    if x.per_key:  # w per key: it scales the output columns
        dk = dk.addcmul_(vc @ ds_out.transpose(-1, -2), w)
    else:  # w per token (or None): fold it into v (dead after this)
        dk = _mm_add_(dk, vc if w is None else vc.mul_(w), ds_out.transpose(-1, -2))

    dg = dgk = None
    if b is not None:
        db = qc.mul_(dq).div_(scale).sub_(kc.mul_(dk))  # [B,H,NC,C,Dk] (dq is scale times d/dqc)
        s_out = torch.cat([s_in[:, :, 1:], s_final[:, :, None]], dim=2)
        db[..., -1, :] += (s_out * ds_out).sum(-1)
        if not x.per_key:
            db = db.sum(-1)
        da = _unchunked(db.flip(3).cumsum(3).flip(3), x.t)  # [B,T,H(,Dk)]
        if gk is not None:
            dgk = da.to(gk.dtype)
            if g is not None:
                dg = da.sum(-1).to(g.dtype)
        elif g is not None:
            dg = da.to(g.dtype)
    d_init = None if initial_state is None else ds0.to(initial_state.dtype)
    return (
        _unchunked(dq, x.t).to(q.dtype),
        _unchunked(dk, x.t).to(k.dtype),
        _unchunked(dv, x.t).to(v.dtype),
        dg,
        dgk,
        d_init,
    )


class ChunkLinearAttentionFunction(torch.autograd.Function):
    """apply(q, k, v, g, gk, initial_state, resets, scale, chunk_size) -> (o, final_state)."""

    @staticmethod
    def forward(fctx, q, k, v, g, gk, initial_state, resets, scale, chunk_size):
        fctx.save_for_backward(q, k, v, g, gk, initial_state, resets)
        fctx.scale, fctx.chunk_size = scale, chunk_size
        return linear_attention_fwd(q, k, v, g, gk, scale, initial_state, resets, chunk_size)

    @staticmethod
    def backward(fctx, do, d_final):
        q, k, v, g, gk, initial_state, resets = fctx.saved_tensors
        grads = linear_attention_bwd(q, k, v, g, gk, fctx.scale, initial_state, resets, fctx.chunk_size, do, d_final)
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
    impl: str = "auto",
):
    """Chunked (gated) linear attention; shapes in the module docstring.

    ``initial_state`` enters the first document of each row only (document starts inside a row
    reset the state to 0); its gradient is returned by autograd, which is what LASP-2 needs.
    impl: "auto" (fla's Triton kernels for CUDA tensors when fla is importable, else the torch
    op here), "chunk" (the torch op here), or "fla". Returns (o, final_state or None).
    """
    if impl not in ("auto", "chunk", "fla"):
        raise ValueError(f"impl={impl!r}: choose auto, chunk or fla")
    if impl == "fla" or (impl == "auto" and q.is_cuda):
        from models.ops.linear_attention import fla_backend

        if impl == "fla" or fla_backend.available():
            return fla_backend.fla_linear_attention(
                q, k, v, g, gk, scale, initial_state, cu_seqlens, output_final_state
            )
    bsz, t = q.shape[:2]
    # on the host (cu_seqlens come from the CPU batch): the op reads its flags without a sync
    resets = resets_from_cu_seqlens(None if cu_seqlens is None else cu_seqlens.cpu(), bsz, t)
    o, final = ChunkLinearAttentionFunction.apply(q, k, v, g, gk, initial_state, resets, float(scale), int(chunk_size))
    return o, (final if output_final_state else None)
