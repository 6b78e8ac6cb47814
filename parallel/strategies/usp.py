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

Configuration: ``ulysses_size``, a constructor option (``parallel.cp.options:
{ulysses_size: 2}``); None picks gcd(cp, n_heads), the largest Ulysses degree the head
count allows (fewest bytes; the ring takes the rest).

Receives per rank and layer in forward: (u-1)/u * B*C*D*e * 2 * (H + Hkv') for the two
all-to-alls plus (r-1) * 2 * B*C*Hkv'*D*e for the ring.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from models.ops.attention import MaskSpec, attention
from parallel.strategies.base import Strategy, register
from parallel.strategies.ring import RingSpec, ring_attention
from parallel.strategies.ulysses import HeadToSeq, check_heads, kv_heads_for, row_order, scatter_heads


@dataclass
class SubMesh:
    """This rank's two sub-groups of one CP group. Member lists hold CP ranks in sub-group
    rank order (``new_group`` sorts by global rank)."""

    ulysses_group: object | None
    ulysses_members: list[int]          # my U_g
    ring_group: object | None
    ring_members: list[list[int]]       # for each member of my R_j: the members of its U_g
    ring_rank: int


def _all_cp_groups(global_ranks: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Global ranks of every CP group in the world (one gather, only when dp > 1)."""
    world = dist.get_world_size()
    if len(global_ranks) == world:
        return [global_ranks]
    every = [None] * world
    dist.all_gather_object(every, global_ranks)
    return sorted(set(every))


def build_submesh(group, cp: int, u: int) -> SubMesh:
    """Create the sub-groups with ``dist.new_group``, identically and in the same order on
    every rank of the world (all CP groups' sub-groups, members or not); keep ours.
    A sub-group that is the whole CP group reuses ``group``; one of size 1 is None."""
    mine = tuple(dist.get_process_group_ranks(group))
    me = mine.index(dist.get_rank())
    r = cp // u
    result = None
    for granks in _all_cp_groups(mine):
        def members(cps, granks=granks):    # CP ranks in their sub-group's rank order
            cps = list(cps)
            return cps if len(cps) == cp else sorted(cps, key=lambda c: granks[c])

        def make(cps, granks=granks):
            if len(cps) == 1 or len(cps) == cp:
                return group if len(cps) == cp and granks == mine else None
            return dist.new_group([granks[c] for c in cps])

        uly = [members(range(g * u, (g + 1) * u)) for g in range(r)]
        rings = [members(uly[g][j] for g in range(r)) for j in range(u)]
        uly_groups, ring_groups = [make(m) for m in uly], [make(m) for m in rings]
        if granks == mine:
            j = next(i for i, m in enumerate(rings) if me in m)
            result = SubMesh(uly_groups[me // u], uly[me // u], ring_groups[j],
                             [uly[c // u] for c in rings[j]], rings[j].index(me))
    return result


@register("usp")
class USP(Strategy):
    ulysses_size: int | None = None

    def __init__(self, ulysses_size: int | None = None):
        if ulysses_size is not None:
            self.ulysses_size = ulysses_size
        self._submeshes: dict = {}      # (CP group ranks, u) -> SubMesh

    def degree(self, cp: int, n_heads: int) -> int:
        return self.ulysses_size if self.ulysses_size is not None else math.gcd(cp, n_heads)

    def check(self, *, n_heads, n_kv_heads, cp, **kw):
        super().check(n_heads=n_heads, n_kv_heads=n_kv_heads, cp=cp, **kw)
        u = self.degree(cp, n_heads)
        if u < 1 or cp % u:
            raise ValueError(f"parallel.cp.ulysses_size={u} does not divide parallel.cp.size={cp} "
                             f"for usp: choose a divisor of {cp} (the ring degree is cp / ulysses_size)")
        check_heads("usp", n_heads, n_kv_heads, u, "parallel.cp.ulysses_size")

    def submesh(self, group, cp: int, u: int) -> SubMesh:
        key = (tuple(dist.get_process_group_ranks(group)), u)
        if key not in self._submeshes:
            self._submeshes[key] = build_submesh(group, cp, u)
        return self._submeshes[key]

    def attention(self, q, k, v, ctx, *, causal=True, window=None, scale=None):
        p = ctx.world_size
        if p == 1:
            mask = MaskSpec(ctx.local_index, ctx.local_index, ctx.local_doc, ctx.local_doc, causal, window)
            return attention(q, k, v, mask, scale, ctx.block)[0]
        self.check(n_heads=q.shape[2], n_kv_heads=k.shape[2], cp=p, seq_len=ctx.seq_len, layout=ctx.layout)
        u = self.degree(p, q.shape[2])
        mesh = self.submesh(ctx.group, p, u)

        def tokens(members):            # (order, row positions) of one U_g's gathered tokens
            return row_order([ctx.index_of(c) for c in members])
        order, _ = tokens(mesh.ulysses_members)
        if u > 1:
            q, k, v = scatter_heads(q, k, v, mesh.ulysses_group, u, order)
        index = [tokens(m)[1] for m in mesh.ring_members]
        spec = RingSpec(mesh.ring_group, mesh.ring_rank, p // u, index, [ctx.doc_of(i) for i in index],
                        causal, window, scale, ctx.block)
        o = ring_attention(q, k, v, spec)                                  # [B, u*C, H/u, D]
        return HeadToSeq.apply(o, mesh.ulysses_group, u, order) if u > 1 else o

    def work_queries(self, ctx, n_heads: int):
        """The queries of my Ulysses group (u consecutive CP ranks) for H / u heads."""
        u = self.degree(ctx.world_size, n_heads)
        g = ctx.rank // u
        return torch.cat([ctx.index_of(c) for c in range(g * u, (g + 1) * u)]), 1.0 / u

    def forward_bytes(self, *, batch, seq_len, cp, n_kv_heads, head_dim, elem_bytes, n_heads) -> int:
        u = self.degree(cp, n_heads)
        c, hkv = seq_len // cp, kv_heads_for(n_heads, n_kv_heads, u)
        uly = (u - 1) * batch * c * 2 * (n_heads + hkv) * head_dim * elem_bytes // u
        ring = (cp // u - 1) * 2 * batch * c * hkv * head_dim * elem_bytes
        return uly + ring
