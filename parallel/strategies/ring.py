"""Ring attention: each rank keeps its Q chunk, the K/V chunks travel around the ring.

Shapes (local shards, one layout everywhere):
    q        [B, T, H, D]        this ring member's queries (T = C, or u*C inside USP)
    k, v     [B, T, Hkv, D]
    kv       [2, B, T, Hkv, D]   k and v stacked: the one buffer that travels
    o        [B, T, H, D]
    lse      [B, H, T]           fp32 (fp64 for fp64 inputs), -inf where a row sees no key

Forward, step s = 0..P-1 on ring member r: the visiting chunk belongs to member
src = (r - s) mod P; the send of that chunk to r+1 (and the receive of the next one from
r-1) is posted *before* the block is computed, and waited for after. Each block is the
kernel's ``attention_forward`` of the local Q against the visiting K/V under the global
MaskSpec (positions and documents of both chunks), skipped entirely when the mask leaves
it empty; partial results are merged by log-sum-exp in fp32/fp64.

Backward (exact): with the merged (o, lse), ``attention_backward`` of one (Q, K/V chunk)
pair gives exactly that chunk's share of dq, dk, dv, so dq is a plain sum over steps.
dK/dV are accumulated *travelling with their K/V chunk*: at step s a rank adds its share
for the visiting chunk to the accumulator that arrived with it and passes it on. After P
steps the accumulator of chunk j has visited every rank once, so one last hop hands the
full dK/dV back to its owner. Per rank: K/V move P-1 times, dK/dV P times (in fp32/fp64).
Every rank posts its sends and receives in the same order (K/V of step s, then dK/dV of
step s), so the two streams in flight on one link are matched in order.

Receives (P-1) * 2 * B * C * Hkv * D * e bytes per rank per layer in forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.ops.attention import MaskSpec, attention_backward, attention_forward, may_attend
from models.ops.attention.fused import piece_dtype
from models.ops.common import acc_dtype, merge_lse
from parallel import comm
from parallel.strategies.base import LayerShape, SoftmaxStrategy, register


@dataclass
class RingSpec:
    """Who is in the ring and where their tokens sit. ``index[j]`` [T] and ``doc[j]``
    [B, T] are the row positions and document ids of ring member j's tokens."""

    group: object | None
    rank: int
    size: int
    index: list[torch.Tensor]
    doc: list[torch.Tensor]
    causal: bool = True
    window: int | None = None
    scale: float | None = None
    block: int = 256
    pattern: object | None = None  # per-KV-head block pattern (S2), or None
    kv_heads: tuple[int, ...] | None = None  # global KV head of each local one (None: all, in order)
    slices: object | None = None  # a SliceMask over the global row, replacing the documents mask
    q_heads: tuple[int, ...] | None = None  # global query head of each local one (None: all, in order)

    def mask(self, src: int) -> MaskSpec:
        if self.slices is not None:
            return MaskSpec(self.index[self.rank], self.index[src], slices=self.slices, q_heads=self.q_heads)
        return MaskSpec(
            self.index[self.rank],
            self.index[src],
            self.doc[self.rank],
            self.doc[src],
            self.causal,
            self.window,
            self.pattern,
            self.kv_heads,
        )


def _neighbours(spec: RingSpec) -> tuple[int, int]:
    return (spec.rank + 1) % spec.size, (spec.rank - 1) % spec.size


def ring_forward(q, k, v, spec: RingSpec):
    """-> (o [B, T, H, D] in q.dtype, lse [B, H, T] fp32/fp64)."""
    acc = acc_dtype(q)
    qa = q.to(piece_dtype(q))  # fp32/fp64 blocks; half on CUDA, where the fused kernel takes it
    bsz, t, h, d = q.shape
    o = torch.zeros(bsz, t, h, d, dtype=acc, device=q.device)
    lse = torch.full((bsz, h, t), -math.inf, dtype=acc, device=q.device)
    dst, src_nb = _neighbours(spec)
    kv = torch.stack([k, v])  # [2, B, T, Hkv, D]
    nxt = torch.empty_like(kv)
    for step in range(spec.size):
        works = []
        if step < spec.size - 1:  # post the next hop before computing this block
            works = comm.send_recv(kv, nxt, dst, src_nb, spec.group)
        mask = spec.mask((spec.rank - step) % spec.size)
        if may_attend(mask, spec.block, k.shape[2]):
            o_i, lse_i = attention_forward(qa, kv[0], kv[1], mask, spec.scale, spec.block)
            o, lse = merge_lse(o, lse, o_i, lse_i)
        for w in works:
            w.wait()
        kv, nxt = nxt, kv
    return o.to(q.dtype), lse


def ring_backward(do, q, k, v, o, lse, spec: RingSpec):
    """-> (dq, dk, dv) for the local chunk; see the module docstring for the scheme."""
    acc = acc_dtype(q)
    run = piece_dtype(q)
    qa, doa = q.to(run), do.to(run)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dst, src_nb = _neighbours(spec)
    kv = torch.stack([k, v])
    nxt = torch.empty_like(kv)
    dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)  # accumulator in hand
    dkv_in = torch.empty_like(dkv)  # the one arriving
    dkv_works: list = []
    for step in range(spec.size):
        kv_works = []
        if step < spec.size - 1:
            kv_works = comm.send_recv(kv, nxt, dst, src_nb, spec.group)
        mask = spec.mask((spec.rank - step) % spec.size)
        share = None
        if may_attend(mask, spec.block, k.shape[2]):
            dq_i, dk_i, dv_i = attention_backward(
                doa, qa, kv[0].to(run), kv[1].to(run), o, lse, mask, spec.scale, spec.block
            )
            dq += dq_i
            share = (dk_i, dv_i)
        if step > 0:  # the accumulator of the visiting chunk has arrived
            for w in dkv_works:
                w.wait()
            dkv, dkv_in = dkv_in, dkv
        if share is not None:
            dkv[0] += share[0]
            dkv[1] += share[1]
        if spec.size > 1:  # pass it on (the last hop returns it to its owner)
            dkv_works = comm.send_recv(dkv, dkv_in, dst, src_nb, spec.group)
        for w in kv_works:
            w.wait()
        kv, nxt = nxt, kv
    if spec.size > 1:
        for w in dkv_works:
            w.wait()
        dkv = dkv_in
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(fctx, q, k, v, spec: RingSpec):
        o, lse = ring_forward(q, k, v, spec)
        fctx.save_for_backward(q, k, v, o, lse)
        fctx.spec = spec
        return o

    @staticmethod
    def backward(fctx, do):
        q, k, v, o, lse = fctx.saved_tensors
        return (*ring_backward(do, q, k, v, o, lse, fctx.spec), None)


def ring_attention(q, k, v, spec: RingSpec) -> torch.Tensor:
    """Differentiable ring attention over ``spec``'s ring: q [B, T, H, D] -> o [B, T, H, D]."""
    return RingAttention.apply(q, k, v, spec)


@register("ring")
class Ring(SoftmaxStrategy):
    kinds = ("softmax", "sparse")  # S2 layers: dense K/V travel, the masks apply the pattern

    def attention(self, q, k, v, ctx, *, causal=True, window=None, scale=None, pattern=None, mask=None):
        index = [ctx.index_of(r) for r in range(ctx.world_size)]
        docs = [ctx.doc_of(i) for i in index]
        spec = RingSpec(
            ctx.group, ctx.rank, ctx.world_size, index, docs, causal, window, scale, ctx.block, pattern, slices=mask
        )
        return ring_attention(q, k, v, spec)

    def computed_steps(self, ctx, mask=None, causal=True, window=None) -> list[int]:
        """The ring steps whose block rank ``ctx.rank`` computes (the others are skipped: no
        slice and no document meets that pair of chunks)."""
        index = [ctx.index_of(r) for r in range(ctx.world_size)]
        spec = RingSpec(
            None,
            ctx.rank,
            ctx.world_size,
            index,
            [ctx.doc_of(i) for i in index],
            causal,
            window,
            block=ctx.block,
            slices=mask,
        )
        return [s for s in range(ctx.world_size) if may_attend(spec.mask((ctx.rank - s) % ctx.world_size), ctx.block)]

    def forward_bytes(self, shape: LayerShape) -> int:
        s = shape
        return (s.cp - 1) * 2 * s.batch * (s.seq_len // s.cp) * s.n_kv_heads * s.head_dim * s.elem_bytes
