"""All-gather KV (Llama-3 style): local queries attend to the gathered K/V of the row with
the global document / causal / window mask; the backward returns dK / dV to their owners.

Shapes (local shards, one layout everywhere):
    q        [B, C, H, D]          this rank's queries
    k, v     [B, C, Hkv, D]
    kv       [2, B, C, Hkv, D]     k and v stacked: what the exchange moves
    gathered [2, B, S*C, Hkv, D]   the chunks of the S source ranks (ascending, self included)
    o        [B, C, H, D];  lse [B, H, C] fp32/fp64

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

Memory (``regather``, default True): the layer is one autograd Function that gathers K/V, runs
the kernel's ``attention_forward`` and keeps for backward only the local q, k, v, o and lse
(plus the mask: positions and document ids, 16 bytes per gathered token and row), so the
activations a rank keeps fall as 1/P like ring's. Its backward gathers K/V again (the same
exchange, counted by ``parallel.comm``), runs ``attention_backward`` from the saved lse and
returns dK / dV to their owners. Keeping the gathered K/V instead (``regather=False``,
``parallel.cp.options.softmax.regather=false``) saves that second exchange but keeps the
S*C gathered tokens of K/V per layer (the whole row's K/V under gather="all"); it runs
``attention()`` on the gathered K/V, so on CUDA its dispatch to FlexAttention (S2 patterns
in half precision, models/ops/flex.py) applies there only. Under activation checkpointing of
whole blocks (``trainer.activation_checkpointing``) a block's activations live only during its
own backward anyway, and the recomputed forward gathers once more: there regather=false saves
an exchange at no cost in memory.

Backward bytes per rank per layer (``backward_bytes``): dK / dV of its chunk from every rank
that read it (the reduce-scatter: the forward volume again, in K/V's dtype), plus with
regather the K/V once more: 2 * forward_bytes with regather, forward_bytes without;
gather="needed" receives at most that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.ops.attention import MaskSpec, attention, attention_backward, attention_forward, may_attend
from models.ops.common import run_starts
from parallel import comm
from parallel.strategies.base import LayerShape, SoftmaxStrategy, register


@dataclass(frozen=True)
class Exchange:
    """One layer's K/V exchange as rank ``rank`` sees it: it receives the chunks of ``sources``
    (ascending, self included) and sends its own to ``targets``;
    ``collective``: one all-gather / reduce-scatter over the group (gather="all")."""

    group: object
    rank: int
    sources: tuple[int, ...]
    targets: tuple[int, ...]
    collective: bool

    def gather(self, kv: torch.Tensor) -> torch.Tensor:
        """kv [2, B, C, Hkv, D] -> the sources' chunks concatenated along dim 2."""
        if self.collective:
            return torch.cat(comm.all_gather(kv, self.group), dim=2)
        bufs = {j: torch.empty_like(kv) for j in self.sources if j != self.rank}
        comm.exchange({r: kv for r in self.targets}, bufs, self.group)
        bufs[self.rank] = kv
        return torch.cat([bufs[j] for j in self.sources], dim=2)

    def return_grad(self, g: torch.Tensor) -> torch.Tensor:
        """g [2, B, S*C, Hkv, D], the gradient of ``gather``'s output -> [2, B, C, Hkv, D]: each
        source's slice goes back to it; ours is the sum of what every reader of our chunk holds."""
        parts = g.split(g.shape[2] // len(self.sources), dim=2)
        if self.collective:
            return comm.reduce_scatter(list(parts), self.group)
        parts = dict(zip(self.sources, parts))
        back = {r: torch.empty_like(parts[self.rank]) for r in self.targets}
        comm.exchange({j: parts[j] for j in self.sources if j != self.rank}, back, self.group)
        grad = parts[self.rank].clone()
        for t in back.values():
            grad += t
        return grad


class GatherKV(torch.autograd.Function):
    """``regather=False``: the exchange as its own autograd node; the kernel after it keeps the
    gathered K/V for backward."""

    @staticmethod
    def forward(fctx, kv, ex: Exchange):
        fctx.ex = ex
        return ex.gather(kv)

    @staticmethod
    def backward(fctx, g):
        return fctx.ex.return_grad(g), None


class RegatherAttention(torch.autograd.Function):
    """``regather=True``: gather, attend, keep only the local q, k, v, o, lse; the backward
    gathers K/V again. Returns (o, lse); lse carries no gradient."""

    @staticmethod
    def forward(fctx, q, k, v, ex: Exchange, mask: MaskSpec, scale, block):
        kv = ex.gather(torch.stack([k, v]))  # [2, B, S*C, Hkv, D], freed on return
        o, lse = attention_forward(q, kv[0], kv[1], mask, scale, block)
        fctx.save_for_backward(q, k, v, o, lse)
        fctx.ex, fctx.mask, fctx.scale, fctx.block = ex, mask, scale, block
        fctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(fctx, do, _dlse):
        q, k, v, o, lse = fctx.saved_tensors
        kv = fctx.ex.gather(torch.stack([k, v]))  # the forward's exchange once more
        dq, dk, dv = attention_backward(do, q, kv[0], kv[1], o, lse, fctx.mask, fctx.scale, fctx.block)
        del kv
        dkv = fctx.ex.return_grad(torch.stack([dk, dv]))
        return dq, dkv[0], dkv[1], None, None, None, None


def _runs(index: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs of consecutive positions in ``index`` as (first, last)."""
    starts = run_starts(index).tolist()
    ends = [s - 1 for s in starts[1:]] + [len(index) - 1]
    return [(int(index[s]), int(index[e])) for s, e in zip(starts, ends)]


def need_matrix(ctx, causal: bool, window: int | None, mask=None) -> list[list[bool]]:
    """need[r][j]: can a query of rank r see a key of rank j? Conservative (bounds per run
    of consecutive positions and per batch row), identical on every rank; with a ``SliceMask``
    exact: some slice holds a pair of r's queries and j's keys."""
    p = ctx.world_size
    if mask is not None:
        index = [ctx.index_of(r) for r in range(p)]
        return [
            [r == j or may_attend(MaskSpec(index[r], index[j], slices=mask), ctx.block) for j in range(p)]
            for r in range(p)
        ]
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


@dataclass
class AllGatherOptions:
    gather: str = "needed"  # needed (only the chunks this rank's queries see) | all
    regather: bool = True  # gather K/V again in backward instead of keeping them

    def validate(self, where: str) -> None:
        if self.gather not in ("needed", "all"):
            raise ValueError(f"{where}.gather={self.gather!r} is unknown: choose needed or all")


@register("allgather", default="softmax")
class AllGatherKV(SoftmaxStrategy):
    kinds = ("softmax", "sparse")  # S2 layers too: it gathers dense K/V, the mask applies the pattern
    Options = AllGatherOptions

    def exchange(self, ctx, causal: bool, window: int | None, mask=None) -> Exchange:
        """Who sends K/V to whom in this layer (no communication)."""
        p, me = ctx.world_size, ctx.rank
        if self.gather == "all":
            return Exchange(ctx.group, me, tuple(range(p)), tuple(r for r in range(p) if r != me), True)
        need = need_matrix(ctx, causal, window, mask)
        sources = tuple(j for j in range(p) if need[me][j])
        targets = tuple(r for r in range(p) if r != me and need[r][me])
        return Exchange(ctx.group, me, sources, targets, False)

    def attention(self, q, k, v, ctx, *, causal=True, window=None, scale=None, pattern=None, mask=None):
        ex = self.exchange(ctx, causal, window, mask)
        kv_index = torch.cat([ctx.index_of(j) for j in ex.sources])
        if mask is not None:
            mask = MaskSpec(ctx.local_index, kv_index, slices=mask)
        else:
            mask = MaskSpec(ctx.local_index, kv_index, ctx.local_doc, ctx.doc_of(kv_index), causal, window, pattern)
        if self.regather:
            return RegatherAttention.apply(q, k, v, ex, mask, scale, ctx.block)[0]
        kv = GatherKV.apply(torch.stack([k, v]), ex)  # [2, B, S*C, Hkv, D], kept for backward
        return attention(q, kv[0], kv[1], mask, scale, ctx.block)[0]

    def needed_bytes(self, ctx, shape: LayerShape, mask=None, causal=True, window=None) -> int:
        """Bytes rank ``ctx.rank`` receives in one layer's forward under ``gather="needed"``: one
        K/V chunk per other rank its queries need (``need_matrix``)."""
        need = need_matrix(ctx, causal, window, mask)[ctx.rank]
        s = shape
        return (sum(need) - 1) * 2 * s.batch * (s.seq_len // s.cp) * s.n_kv_heads * s.head_dim * s.elem_bytes

    def forward_bytes(self, shape: LayerShape) -> int:
        """The all-gather volume; ``gather="needed"`` receives at most this (exactly this on the
        rank whose queries see every chunk, e.g. rank 0 under zigzag + causal)."""
        s = shape
        return (s.cp - 1) * 2 * s.batch * (s.seq_len // s.cp) * s.n_kv_heads * s.head_dim * s.elem_bytes

    def backward_bytes(self, shape: LayerShape) -> int:
        """Bytes one rank receives in one layer's backward: the reduce-scatter of dK / dV
        (= forward_bytes, gradients in K/V's dtype), plus the K/V gathered again with regather.
        ``gather="needed"`` receives at most this (exactly this under zigzag + causal)."""
        return (2 if self.regather else 1) * self.forward_bytes(shape)
