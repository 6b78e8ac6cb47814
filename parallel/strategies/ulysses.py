"""Ulysses: all-to-all from sequence-sharded to head-sharded, full-row attention, back.

Shapes (P = CP size, C tokens per rank, N = P * C):
    q            [B, C, H, D]        sequence-sharded input (local tokens, all heads)
    k, v         [B, C, Hkv, D]
    packed       [B, C, P * (h + 2 hk), D]   per destination rank: its q, k, v heads
    head-sharded [B, N, h + 2 hk, D] all tokens (global row order), this rank's heads
    o            [B, N, h, D] -> [B, C, H, D]
with h = H / P query heads and hk = Hkv' / P kv heads per rank. Rank i holds query heads
[i*h, (i+1)*h) and kv heads [i*hk, (i+1)*hk), which serve exactly those query heads.

GQA: when Hkv % P != 0 each kv head is repeated Hkv' / Hkv times, Hkv' = lcm(Hkv, P) (it
divides H because P and Hkv both do); replica j' serves the same query heads as its
original (j' // rep), and autograd sums the replicas' gradients back.

Receives, per rank and layer in forward: q (P-1)/P * B*C*H*D*e, k and v (P-1)/P * B*C*Hkv'*D*e
each, o (P-1)/P * B*C*H*D*e; in all (P-1)/P * B*C*D*e * 2 * (H + Hkv').
"""

from __future__ import annotations

import math

import torch

from models.ops.attention import MaskSpec, attention
from parallel import comm
from parallel.strategies.base import LayerShape, SoftmaxStrategy, register


def _inverse(order: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel())
    return inv


def seq_to_head(x, group, size: int, order: torch.Tensor | None):
    """x [B, C, size*h, D] -> [B, size*C, h, D]: this rank's head slice of every member's
    tokens, concatenated in member order, then reordered by ``order`` (None: keep)."""
    b, c, hx, d = x.shape
    outs = [x.new_empty(b, c, hx // size, d) for _ in range(size)]
    comm.all_to_all(outs, list(x.chunk(size, dim=2)), group)
    y = torch.cat(outs, dim=1)
    return y if order is None else y.index_select(1, order.to(y.device))


def head_to_seq(y, group, size: int, order: torch.Tensor | None):
    """The inverse of :func:`seq_to_head`: y [B, size*C, h, D] -> [B, C, size*h, D]."""
    if order is not None:
        y = y.index_select(1, _inverse(order).to(y.device))
    b, n, h, d = y.shape
    outs = [y.new_empty(b, n // size, h, d) for _ in range(size)]
    comm.all_to_all(outs, list(y.chunk(size, dim=1)), group)
    return torch.cat(outs, dim=2)


class SeqToHead(torch.autograd.Function):
    """Autograd: forward :func:`seq_to_head`, backward :func:`head_to_seq`."""

    @staticmethod
    def forward(fctx, x, group, size, order):
        fctx.args = (group, size, order)
        return seq_to_head(x, group, size, order)

    @staticmethod
    def backward(fctx, g):
        return head_to_seq(g, *fctx.args), None, None, None


class HeadToSeq(torch.autograd.Function):
    """Autograd: forward :func:`head_to_seq`, backward :func:`seq_to_head`."""

    @staticmethod
    def forward(fctx, y, group, size, order):
        fctx.args = (group, size, order)
        return head_to_seq(y, group, size, order)

    @staticmethod
    def backward(fctx, g):
        return seq_to_head(g, *fctx.args), None, None, None


def row_order(index: list[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Tokens arrive concatenated in member order with positions ``cat(index)``; return
    the ``order`` that sorts them (None if already sorted) and the sorted positions.
    Row order keeps the kernel's block skipping tight (zigzag halves come back together)."""
    gathered = torch.cat(index)
    order = torch.argsort(gathered)
    if torch.equal(order, torch.arange(order.numel())):
        return None, gathered
    return order, gathered[order]


def kv_heads_for(n_heads: int, n_kv_heads: int, size: int) -> int:
    """Kv head count after replication so that ``size`` ranks each get whole kv heads."""
    return n_kv_heads if n_kv_heads % size == 0 else n_kv_heads * size // math.gcd(n_kv_heads, size)


def scatter_heads(q, k, v, group, size: int, order: torch.Tensor | None):
    """One all-to-all for q, k, v: [B, C, H|Hkv, D] -> head-sharded (q, k, v), each
    [B, size*C, H/size | Hkv'/size, D]. Differentiable."""
    h, hkv = q.shape[2], k.shape[2]
    rep = kv_heads_for(h, hkv, size) // hkv
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    b, c, _, d = q.shape
    hq, hk = h // size, k.shape[2] // size
    packed = torch.cat(
        [q.reshape(b, c, size, hq, d), k.reshape(b, c, size, hk, d), v.reshape(b, c, size, hk, d)], dim=3
    ).reshape(b, c, size * (hq + 2 * hk), d)
    full = SeqToHead.apply(packed, group, size, order)  # [B, size*C, hq+2hk, D]
    return full.split([hq, hk, hk], dim=2)


def held_kv_heads(n_heads: int, n_kv_heads: int, size: int, rank: int) -> tuple[int, ...]:
    """The global KV heads (before replication) of the local KV heads of head-shard ``rank``
    after :func:`scatter_heads`: what a per-head block pattern must be evaluated for."""
    hkv = kv_heads_for(n_heads, n_kv_heads, size)
    rep, hk = hkv // n_kv_heads, hkv // size
    return tuple((rank * hk + j) // rep for j in range(hk))


def check_heads(name: str, n_heads: int, n_kv_heads: int, size: int, setting: str) -> None:
    if n_heads % size:
        raise ValueError(
            f"model.n_heads={n_heads} is not divisible by {setting}={size} for {name}: "
            f"every rank must hold whole query heads; choose a {setting} that divides "
            f"{n_heads}, or use the ring or allgather strategy"
        )
    if n_heads % n_kv_heads:
        raise ValueError(f"model.n_heads={n_heads} is not a multiple of model.n_kv_heads={n_kv_heads}")


@register("ulysses")
class Ulysses(SoftmaxStrategy):
    kinds = ("softmax", "sparse")  # S2 layers: the mask knows the global KV heads of this rank

    def check(self, *, n_heads, n_kv_heads, cp, **kw):
        super().check(n_heads=n_heads, n_kv_heads=n_kv_heads, cp=cp, **kw)
        check_heads("ulysses", n_heads, n_kv_heads, cp, "parallel.cp.size")

    def attention(self, q, k, v, ctx, *, causal=True, window=None, scale=None, pattern=None, mask=None):
        p = ctx.world_size
        check_heads("ulysses", q.shape[2], k.shape[2], p, "parallel.cp.size")
        order, pos = row_order([ctx.index_of(r) for r in range(p)])
        if mask is not None:  # this rank's query heads: [rank * H/P, (rank + 1) * H/P)
            hq = q.shape[2] // p
            mask = MaskSpec(pos, pos, slices=mask, q_heads=tuple(range(ctx.rank * hq, (ctx.rank + 1) * hq)))
        else:
            doc = ctx.doc_of(pos)
            heads = held_kv_heads(q.shape[2], k.shape[2], p, ctx.rank) if pattern is not None else None
            mask = MaskSpec(pos, pos, doc, doc, causal, window, pattern, heads)
        qh, kh, vh = scatter_heads(q, k, v, ctx.group, p, order)
        o = attention(qh, kh, vh, mask, scale, ctx.block)[0]  # [B, N, H/P, D]
        return HeadToSeq.apply(o, ctx.group, p, order)

    def work_queries(self, ctx, n_heads: int, n_kv_heads: int, *, causal=True, window=None):
        """Every rank attends with all N queries for H / P heads."""
        return torch.arange(ctx.seq_len), 1.0 / ctx.world_size

    def forward_bytes(self, shape: LayerShape) -> int:
        s = shape
        c, hkv = s.seq_len // s.cp, kv_heads_for(s.n_heads, s.n_kv_heads, s.cp)
        return (s.cp - 1) * s.batch * c * 2 * (s.n_heads + hkv) * s.head_dim * s.elem_bytes // s.cp
