"""S2-aware context parallelism (kind ``sparse``): each rank receives, per KV head, only the
key blocks that head's S2 pattern lets its queries see -- a sparse all-gather of K/V.

Shapes (P = CP size, C = N / P tokens per rank, b = pattern.block):
    q        [B, C, H, D], k, v [B, C, Hkv, D]       local shards
    kv_g     [2, B, T_g, |g|, D]                      K/V of head group g: my whole chunk
                                                      plus the needed tiles of every other rank
    o        [B, C, H, D]

KV heads with the same layout form a group (models.ops.attention.head_groups: one per
offset, one for dense heads, all heads when homogeneous). For each group g and each pair
(rank r, rank j != r), ``needed(r, j, g)`` lists the tiles of b consecutive tokens of j's
chunk that hold a key some query of r may see: block pattern, causality, window and
documents (any batch row), at tile level (models.ops.attention.tile_candidates). Every rank
computes the same lists from positions and ``cu_seqlens``: no communication. One
point-to-point exchange per layer moves them (all groups in one buffer per peer);
backward returns dK / dV of every sent tile to its owner the same way. The kernel then
runs per group on its gathered keys, so each head's work and its received bytes follow
its own pattern.

Bytes received per rank in forward (``rank_forward_bytes`` counts them exactly, token by token
from the pattern and the documents, independently of the exchange code): per KV head hk and
rank j != r, every key tile of j's chunk (consecutive positions in one block of b tokens, one
document and one pattern block of every row) holding a key k that some query q of r sees,
i.e. in some row, q in k's document with k <= q (q - k < window) and
    q's pattern block - k's < local, or (k's pattern block + off_hk) % s == 0, or hk dense,
at 2 * B * D * e bytes per token. For single-document rows and whole-block chunks: for the last
rank of a contiguous layout about (N * (1/s) + (local - 1) * b) * Hkv tokens of K and V, against
(P - 1) * C * Hkv for the dense all-gather: a fraction of about 1/s + local * b / N of its
volume (dense heads count as s = 1). Zigzag halves that are not whole blocks or documents
that do not start at a block boundary add at most a partial tile per boundary.
"""

from __future__ import annotations

import torch

from models.ops.attention import MaskSpec, attention, head_groups, tile_candidates
from models.ops.attention.plan import pattern_tiles
from models.ops.documents import row_doc_ids
from models.s2_pattern import check_sparse_options
from parallel import comm
from parallel.sharding import local_index
from parallel.strategies.base import LayerShape, Strategy, register


def needed_tiles(ctx, pattern, head: int, r: int, j: int, causal: bool, window) -> torch.Tensor:
    """Local indices (into rank j's chunk, ascending) of the keys rank r's queries may need
    for global KV head ``head``: whole key tiles (models.ops.attention.Tiles: consecutive
    positions in one pattern block and one document of every row), each holding a key some
    query of r sees (block pattern, causality, window, documents, any batch row). [n] int64"""
    qi, ki = ctx.index_of(r), ctx.index_of(j)
    mask = MaskSpec(qi, ki, ctx.doc_of(qi), ctx.doc_of(ki), causal, window, pattern, (head,))
    _, ok = tile_candidates(mask, pattern.block, 1)  # [B, 1, nq, nk], exact at tile level
    _, kt = pattern_tiles(mask)
    return kt.index(ok.any(0).any(0).any(0).nonzero().flatten()).sort().values


def exchange_plan(ctx, pattern, n_kv: int, causal: bool, window):
    """(groups, recv, send): ``groups`` = head_groups (local = global KV heads here);
    ``recv[g][j]`` indices of j's chunk I receive for group g, ``send[g][t]`` indices of my
    chunk rank t receives from me. Identical on every rank."""
    me, p = ctx.rank, ctx.world_size
    probe = MaskSpec(ctx.local_index, ctx.local_index, ctx.local_doc, ctx.local_doc, causal, window, pattern)
    groups = head_groups(probe, n_kv)
    recv = [{j: needed_tiles(ctx, pattern, h, me, j, causal, window) for j in range(p) if j != me} for _, h in groups]
    send = [{t: needed_tiles(ctx, pattern, h, t, me, causal, window) for t in range(p) if t != me} for _, h in groups]
    return groups, recv, send


def add_returned(grad: torch.Tensor, heads: slice, index: torch.Tensor, part: torch.Tensor) -> None:
    """grad [2, B, C, Hkv, D] += the dK / dV ``part`` [2, B, n, |heads|, D] a peer returns for my
    tokens ``index`` [n] (the send plan lives on CPU: moved to grad's device)."""
    grad.narrow(3, heads.start, heads.stop - heads.start).index_add_(2, index.to(grad.device), part)


class GatherBlocks(torch.autograd.Function):
    """kv [2, B, C, Hkv, D] -> per head group g: [2, B, T_g, |g|, D], the chunks of ranks
    0..P-1 in order (mine whole, the others' needed tokens). Backward: dK / dV of received
    tokens go back to their owners and are added to my gradient at the tokens I sent."""

    @staticmethod
    def forward(fctx, kv, group, rank, world, groups, recv, send):
        send = [{t: x.to(kv.device) for t, x in sg.items()} for sg in send]  # gather / index_add_ on kv's device
        fctx.group, fctx.rank, fctx.world, fctx.groups, fctx.recv, fctx.send = group, rank, world, groups, recv, send
        two, b, _, _, d = kv.shape
        sends = {
            t: torch.cat([kv[:, :, send[g][t], hs].reshape(-1) for g, (hs, _) in enumerate(groups)])
            for t in range(world)
            if t != rank
        }
        sizes = {
            j: [two * b * recv[g][j].numel() * (hs.stop - hs.start) * d for g, (hs, _) in enumerate(groups)]
            for j in range(world)
            if j != rank
        }
        bufs = {j: kv.new_empty(sum(s)) for j, s in sizes.items()}
        comm.exchange(
            {t: x for t, x in sends.items() if x.numel()}, {j: x for j, x in bufs.items() if x.numel()}, group
        )
        outs = []
        for g, (hs, _) in enumerate(groups):
            parts = []
            for j in range(world):
                if j == rank:
                    parts.append(kv[:, :, :, hs])
                else:
                    off = sum(sizes[j][:g])
                    n = recv[g][j].numel()
                    parts.append(bufs[j][off : off + sizes[j][g]].view(two, b, n, hs.stop - hs.start, d))
            outs.append(torch.cat(parts, dim=2))
        fctx.chunk = kv.shape[2]
        return tuple(outs)

    @staticmethod
    def backward(fctx, *grads):
        rank, world, groups, recv, send = fctx.rank, fctx.world, fctx.groups, fctx.recv, fctx.send
        c = fctx.chunk
        lengths = [[c if j == rank else recv[g][j].numel() for j in range(world)] for g in range(len(groups))]
        ref = next(x for x in grads if x is not None)
        two, b, _, _, d = ref.shape
        grad = ref.new_zeros(two, b, c, sum(hs.stop - hs.start for hs, _ in groups), d)
        back = {j: [] for j in range(world) if j != rank}
        for g, (hs, _) in enumerate(groups):
            gg = grads[g]
            if gg is None:
                gg = ref.new_zeros(two, b, sum(lengths[g]), hs.stop - hs.start, d)
            for j, part in enumerate(gg.split(lengths[g], dim=2)):
                if j == rank:
                    grad[:, :, :, hs] += part
                else:
                    back[j].append(part.reshape(-1))
        sends = {j: torch.cat(x) for j, x in back.items()}
        bufs = {
            t: ref.new_empty(
                sum(two * b * send[g][t].numel() * (hs.stop - hs.start) * d for g, (hs, _) in enumerate(groups))
            )
            for t in range(world)
            if t != rank
        }
        comm.exchange(
            {j: x for j, x in sends.items() if x.numel()}, {t: x for t, x in bufs.items() if x.numel()}, fctx.group
        )
        for t, buf in bufs.items():
            off = 0
            for g, (hs, _) in enumerate(groups):
                n, w = send[g][t].numel(), hs.stop - hs.start
                add_returned(grad, hs, send[g][t], buf.narrow(0, off, two * b * n * w * d).view(two, b, n, w, d))
                off += two * b * n * w * d
        return grad, None, None, None, None, None, None


def _tile_ids(pos: torch.Tensor, doc: torch.Tensor, blk: torch.Tensor, block: int) -> torch.Tensor:
    """[T] tile id of each entry of a chunk: a new tile at every break of consecutive positions,
    row block, or document / pattern block of any row."""
    new = torch.ones_like(pos, dtype=torch.bool)
    new[1:] = (
        (pos[1:] - pos[:-1] != 1)
        | (pos[1:] // block != pos[:-1] // block)
        | (doc[:, 1:] != doc[:, :-1]).any(0)
        | (blk[:, 1:] != blk[:, :-1]).any(0)
    )
    return new.cumsum(0) - 1


def rank_forward_bytes(shape: LayerShape, rank: int, causal: bool = True, cu_seqlens=None, window=None) -> int:
    """Bytes rank ``rank`` receives in one forward, counted token by token from the pattern and
    the documents (``cu_seqlens`` over the flattened [B * N] batch, None: one per row; see the
    module docstring)."""
    if not causal:
        raise ValueError("strategy 's2' (S2) is causal only")
    s, pat = shape, shape.pattern.bind(cu_seqlens, shape.batch, shape.seq_len)
    n, b = s.seq_len, pat.block
    cu = torch.arange(0, s.batch * n + 1, n) if cu_seqlens is None else cu_seqlens.to("cpu", torch.int64)
    pos = torch.arange(n)
    doc = row_doc_ids(cu, s.batch, n, pos)  # [B, N]
    row0 = torch.arange(s.batch)[:, None] * n
    start = (cu[doc] - row0).clamp(min=0)  # each token's document start in its row
    end = (cu[doc + 1] - row0).clamp(max=n) - 1  # and its last position
    blk = pat.blocks(pos, doc).expand(s.batch, n)  # [B, N] pattern block
    mine = local_index(n, rank, s.cp, s.layout).sort().values
    total = 0
    for hk in range(s.n_kv_heads):
        wide = pat.dense[hk] or pat.stride == 1
        strided = ((blk + pat.offsets[hk]) % pat.stride == 0) | wide
        hi = torch.where(strided, end, torch.minimum(end, start + (blk + pat.local) * b - 1))
        if window is not None:
            hi = torch.minimum(hi, pos + window - 1)
        seen = torch.searchsorted(mine, hi, right=True) > torch.searchsorted(mine, pos.expand_as(hi))  # [B, N]
        needed = seen.any(0)  # a key some query of mine sees, in any row
        for j in range(s.cp):
            if j == rank:
                continue
            idx = local_index(n, j, s.cp, s.layout)
            tiles = _tile_ids(idx, doc[:, idx], blk[:, idx], b)
            hit = torch.zeros(int(tiles[-1]) + 1, dtype=torch.bool).index_put_((tiles,), needed[idx], accumulate=True)
            total += int(hit[tiles].sum())
    return total * 2 * s.batch * s.head_dim * s.elem_bytes


def block_work(seq_len: int, cp: int, layout: str, pattern, rank: int, n_kv: int) -> int:
    """Active (KV head, query block, key block) triples of rank ``rank``'s queries: its
    attention work under the pattern (for compute balance, max / mean over ranks)."""
    qb = torch.tensor(sorted(set((local_index(seq_len, rank, cp, layout) // pattern.block).tolist())))
    kb = torch.arange(-(-seq_len // pattern.block))
    return sum(int(pattern.active(qb[:, None], kb[None, :], torch.tensor(h)).sum()) for h in range(n_kv))


@register("s2", default="sparse")
class S2Gather(Strategy):
    kinds = ("sparse",)

    def __call__(self, q, k, v, ctx, *, pattern=None, causal=True, window=None, scale=None):
        check_sparse_options(pattern, causal)
        plans = ctx.__dict__.setdefault("_s2_plans", {})  # per batch context: layers share plans
        key = (pattern, k.shape[2], causal, window)
        if key not in plans:
            plans[key] = exchange_plan(ctx, pattern, k.shape[2], causal, window)
        groups, recv, send = plans[key]
        kvs = GatherBlocks.apply(torch.stack([k, v]), ctx.group, ctx.rank, ctx.world_size, groups, recv, send)
        rep = q.shape[2] // k.shape[2]
        outs = []
        for g, ((hs, _), kv) in enumerate(zip(groups, kvs)):
            kv_index = torch.cat(
                [ctx.local_index if j == ctx.rank else ctx.index_of(j)[recv[g][j]] for j in range(ctx.world_size)]
            )
            heads = tuple(range(hs.start, hs.stop))
            mask = MaskSpec(
                ctx.local_index, kv_index, ctx.local_doc, ctx.doc_of(kv_index), causal, window, pattern, heads
            )
            qg = q[:, :, hs.start * rep : hs.stop * rep]
            outs.append(attention(qg, kv[0], kv[1], mask, scale, ctx.block)[0])
        return torch.cat(outs, dim=2)

    def forward_bytes(self, shape: LayerShape) -> int:
        """The most any rank receives (``rank_forward_bytes``, one document per row); needs
        ``shape.pattern``."""
        return self.forward_bytes_of(shape, None)

    def forward_bytes_of(self, shape: LayerShape, cu_seqlens, window=None) -> int:
        """The most any rank receives for a batch with documents ``cu_seqlens`` (flattened
        [B * N] starts, None: one per row) and a sliding ``window``."""
        if shape.pattern is None:
            raise ValueError("strategy 's2' counts bytes from the layer's pattern: set LayerShape.pattern")
        return max(rank_forward_bytes(shape, r, True, cu_seqlens, window) for r in range(shape.cp))
