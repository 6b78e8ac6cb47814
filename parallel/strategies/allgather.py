"""All-gather KV (Llama-3 style): local queries attend to the gathered K/V of the row with
the global document / causal / window mask; the backward returns dK / dV to their owners.

Two exchanges, same result:
  * ``gather="all"``: one all-gather of K and V per layer (one collective), backward
    reduce-scatter. Receives (P-1) * 2 * B * C * Hkv * D * e bytes per rank per layer.
  * ``gather="needed"`` (default): each rank receives only the K/V chunks its queries can
    see -- the causal prefix, the sliding window, and only chunks sharing a document with
    its queries -- by point-to-point sends; backward sends dK / dV back the same way. The
    need matrix is computed identically on every rank from positions and ``cu_seqlens``
    (no communication). Receives at most the all-gather volume; with the contiguous layout
    rank r receives r chunks under a causal mask, with a window only the chunks it reaches.
    (Under zigzag + causal every rank's first half lies in every causal prefix, so only
    windows and documents save bytes there.)
"""

from __future__ import annotations

import torch

from models.ops.attention import MaskSpec, attention
from parallel import comm
from parallel.strategies.base import LayerShape, SoftmaxStrategy, register


class GatherSequence(torch.autograd.Function):
    """x [..., C, ...] on each rank -> cat over ranks along ``dim`` (rank order);
    backward: reduce-scatter of the gradient."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim, ctx.c = group, dim, x.shape[dim]
        return torch.cat(comm.all_gather(x, group), dim=dim)

    @staticmethod
    def backward(ctx, g):
        chunks = list(g.split(ctx.c, dim=ctx.dim))
        return comm.reduce_scatter(chunks, ctx.group), None, None


class GatherNeeded(torch.autograd.Function):
    """kv [2, B, C, Hkv, D] -> cat of the chunks of ranks ``sources`` (ascending, self
    included) along dim 2; ``targets``: ranks that need our chunk. Backward: each source's
    gradient slice goes back to it; our own gradient is the sum of what the targets return."""

    @staticmethod
    def forward(ctx, kv, group, rank, sources, targets):
        ctx.group, ctx.rank, ctx.sources, ctx.targets = group, rank, sources, targets
        bufs = {j: torch.empty_like(kv) for j in sources if j != rank}
        comm.exchange({r: kv for r in targets}, bufs, group)
        bufs[rank] = kv
        return torch.cat([bufs[j] for j in sources], dim=2)

    @staticmethod
    def backward(ctx, g):
        c = g.shape[2] // len(ctx.sources)
        parts = dict(zip(ctx.sources, g.split(c, dim=2)))
        back = {r: torch.empty_like(parts[ctx.rank]) for r in ctx.targets}
        comm.exchange({j: parts[j] for j in ctx.sources if j != ctx.rank}, back, ctx.group)
        grad = parts[ctx.rank].clone()
        for t in back.values():
            grad += t
        return grad, None, None, None, None


def _runs(index: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs of consecutive positions in ``index`` as (first, last)."""
    cut = (index[1:] != index[:-1] + 1).nonzero().flatten().tolist()
    starts = [0] + [c + 1 for c in cut]
    ends = cut + [len(index) - 1]
    return [(int(index[s]), int(index[e])) for s, e in zip(starts, ends)]


def need_matrix(ctx, causal: bool, window: int | None) -> list[list[bool]]:
    """need[r][j]: can a query of rank r see a key of rank j? Conservative (bounds per run
    of consecutive positions and per batch row), identical on every rank."""
    p = ctx.world_size
    runs = [_runs(ctx.index_of(r)) for r in range(p)]
    bounds = torch.tensor([[lo, hi] for r in range(p) for lo, hi in runs[r]])
    docs = ctx.doc_of(bounds.flatten()).view(ctx.batch_size, -1, 2)  # [B, n_runs, 2]
    owner = [r for r in range(p) for _ in runs[r]]
    need = [[r == j for j in range(p)] for r in range(p)]
    for a, (qlo, qhi) in enumerate(bounds.tolist()):
        for b, (klo, khi) in enumerate(bounds.tolist()):
            if causal and klo > qhi:
                continue
            if window is not None and (qlo - khi >= window or (not causal and klo - qhi >= window)):
                continue
            shared = ((docs[:, b, 0] <= docs[:, a, 1]) & (docs[:, b, 1] >= docs[:, a, 0])).any()
            if shared:
                need[owner[a]][owner[b]] = True
    return need


@register("allgather", default="softmax")
class AllGatherKV(SoftmaxStrategy):
    kinds = ("softmax", "sparse")  # S2 layers too: it gathers dense K/V, the mask applies the pattern

    def __init__(self, gather: str = "needed"):
        if gather not in ("needed", "all"):
            raise ValueError(f"parallel.cp.allgather_mode={gather!r} is unknown: choose needed or all")
        self.gather = gather

    def attention(self, q, k, v, ctx, *, causal=True, window=None, scale=None, pattern=None):
        kv = torch.stack([k, v])  # [2, B, C, Hkv, D]
        p, me = ctx.world_size, ctx.rank
        if self.gather == "all":
            sources = list(range(p))
            kv = GatherSequence.apply(kv, ctx.group, 2)  # [2, B, P*C, Hkv, D]
        else:
            need = need_matrix(ctx, causal, window)
            sources = [j for j in range(p) if need[me][j]]
            targets = [r for r in range(p) if r != me and need[r][me]]
            kv = GatherNeeded.apply(kv, ctx.group, me, sources, targets)
        kv_index = torch.cat([ctx.index_of(j) for j in sources])
        mask = MaskSpec(ctx.local_index, kv_index, ctx.local_doc, ctx.doc_of(kv_index), causal, window, pattern)
        return attention(q, kv[0], kv[1], mask, scale, ctx.block)[0]

    def forward_bytes(self, shape: LayerShape) -> int:
        """The all-gather volume; ``gather="needed"`` receives at most this (exactly this on the
        rank whose queries see every chunk, e.g. rank 0 under zigzag + causal)."""
        s = shape
        return (s.cp - 1) * 2 * s.batch * (s.seq_len // s.cp) * s.n_kv_heads * s.head_dim * s.elem_bytes
