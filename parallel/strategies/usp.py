"""USP: 2-D context parallelism, Ulysses (degree u) x ring (degree r), cp = u * r.

The CP group (cp ranks) is cut into r Ulysses groups of u consecutive CP ranks
(U_g = CP ranks [g*u, (g+1)*u), neighbours, e.g. one node) and u ring groups, one per
head slice (R_j = the j-th member of every U_g). Per layer:

    q [B, C, H, D], k, v [B, C, Hkv, D]                     sequence-sharded, C = N / cp
      -- all-to-all in U_g -->  [B, u*C, H/u | Hkv'/u, D]   U_g's tokens (row order), my heads
      -- ring over R_j     -->  o [B, u*C, H/u, D]           K/V of the other U_g travel
      -- all-to-all back   -->  o [B, C, H, D]

Hkv' = lcm(Hkv, u) when u does not divide Hkv (kv heads replicated, as in ulysses.py).
Exact for any layout: the ring masks use the explicit row positions of each U_g's tokens.

Configuration: ``ulysses_size``, an option (``parallel.cp.options.softmax.ulysses_size=2``);
None picks gcd(cp, n_heads), the largest Ulysses degree the head count allows (fewest bytes; the ring takes the rest).

Receives per rank and layer in forward: (u-1)/u * B*C*D*e * 2 * (H + Hkv') for the two
all-to-alls plus (r-1) * 2 * B*C*Hkv'*D*e for the ring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from parallel.strategies.base import LayerShape, SoftmaxStrategy, register
from parallel.strategies.ring import RingSpec, ring_attention
from parallel.strategies.ulysses import HeadToSeq, check_heads, held_kv_heads, kv_heads_for, row_order, scatter_heads


@dataclass
class USPOptions:
    ulysses_size: int | None = None  # the Ulysses degree u (ring degree cp / u); None: gcd(cp, n_heads)

    def validate(self, where: str) -> None:
        if self.ulysses_size is not None and self.ulysses_size < 1:
            raise ValueError(f"{where}.ulysses_size={self.ulysses_size} must be >= 1, or null for gcd(cp, n_heads)")


@register("usp")
class USP(SoftmaxStrategy):
    kinds = ("softmax", "sparse")  # S2 layers: the ring masks know the global KV heads held
    Options = USPOptions

    def degree(self, cp: int, n_heads: int) -> int:
        return self.ulysses_size if self.ulysses_size is not None else math.gcd(cp, n_heads)

    def check(self, *, n_heads, n_kv_heads, cp, **kw):
        super().check(n_heads=n_heads, n_kv_heads=n_kv_heads, cp=cp, **kw)
        u = self.degree(cp, n_heads)
        if u < 1 or cp % u:
            raise ValueError(
                f"parallel.cp.ulysses_size={u} does not divide parallel.cp.size={cp} "
                f"for usp: choose a divisor of {cp} (the ring degree is cp / ulysses_size)"
            )
        check_heads("usp", n_heads, n_kv_heads, u, "parallel.cp.ulysses_size")

    def subgroup_sizes(self, cp: int, n_heads: int) -> list[int]:
        """The Ulysses degree u: parallel.mesh builds the u-rank Ulysses groups and the
        (cp / u)-rank ring groups at start-up."""
        return [self.degree(cp, n_heads)]

    def attention(self, q, k, v, ctx, *, causal=True, window=None, scale=None, pattern=None, mask=None):
        p = ctx.world_size
        self.check(n_heads=q.shape[2], n_kv_heads=k.shape[2], cp=p, seq_len=ctx.seq_len, layout=ctx.layout)
        u = self.degree(p, q.shape[2])
        mesh = ctx.subgroups.get(u)
        if mesh is None:
            raise ValueError(
                f"usp needs the Ulysses/ring sub-groups of degree {u}, which were not "
                "built at start-up: build them with parallel.mesh.build_subgroups "
                "(init_mesh does it for the configured strategies)"
            )

        def tokens(members):  # (order, row positions) of one U_g's gathered tokens
            return row_order([ctx.index_of(c) for c in members])

        order, _ = tokens(mesh.ulysses_members)
        heads = q_heads = None
        if pattern is not None:
            heads = held_kv_heads(q.shape[2], k.shape[2], u, mesh.ulysses_members.index(ctx.rank))
        if mask is not None:  # the query heads of my Ulysses slot
            hq, slot = q.shape[2] // u, mesh.ulysses_members.index(ctx.rank)
            q_heads = tuple(range(slot * hq, (slot + 1) * hq))
        if u > 1:
            q, k, v = scatter_heads(q, k, v, mesh.ulysses_group, u, order)
        index = [tokens(m)[1] for m in mesh.ring_members]
        spec = RingSpec(
            mesh.ring_group,
            mesh.ring_rank,
            p // u,
            index,
            [ctx.doc_of(i) for i in index],
            causal,
            window,
            scale,
            ctx.block,
            pattern,
            heads,
            mask,
            q_heads,
        )
        o = ring_attention(q, k, v, spec)  # [B, u*C, H/u, D]
        return HeadToSeq.apply(o, mesh.ulysses_group, u, order) if u > 1 else o

    def work_queries(self, ctx, n_heads: int, n_kv_heads: int, *, causal=True, window=None):
        """The queries of my Ulysses group (u consecutive CP ranks) for H / u heads."""
        u = self.degree(ctx.world_size, n_heads)
        g = ctx.rank // u
        return torch.cat([ctx.index_of(c) for c in range(g * u, (g + 1) * u)]), 1.0 / u

    def forward_bytes(self, shape: LayerShape) -> int:
        s = shape
        u = self.degree(s.cp, s.n_heads)
        c, hkv = s.seq_len // s.cp, kv_heads_for(s.n_heads, s.n_kv_heads, u)
        uly = (u - 1) * s.batch * c * 2 * (s.n_heads + hkv) * s.head_dim * s.elem_bytes // u
        ring = (s.cp // u - 1) * 2 * s.batch * c * hkv * s.head_dim * s.elem_bytes
        return uly + ring
