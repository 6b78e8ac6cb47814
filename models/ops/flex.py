"""FlexAttention path for S2 block patterns on CUDA (torch.nn.attention.flex_attention).

Used by ``models.ops.attention.attention`` when the mask carries an ``S2Pattern``, the
tensors are on CUDA in half precision and flex_attention is available; everything else
takes the PyTorch path. The whole MaskSpec becomes one ``mask_mod`` over explicit row
positions (documents, causality, window, the per-head pattern through the global KV head of
each query head), and ``create_block_mask`` turns it into a BlockMask, so the kernel skips
inactive blocks. On CUDA the block mask is built compiled (block by block: eager construction
materialises [B, H, Tq, Tk], 72 GB at 32K with 32 heads) and lengths are padded to a few
buckets per octave (``bucket``), so the static-shape compile does not recompile per length.
Forward-only on CPU (flex_attention has no CPU backward), which the tests use to check the
mask_mod in fp64.

Shapes: q [B, Tq, H, D], k, v [B, Tk, Hkv, D] -> (o [B, Tq, H, D], lse [B, H, Tq] fp32);
flex_attention takes [B, H, T, D].
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import torch

FLEX_BLOCK = 128  # BlockMask granularity of the Triton kernel


def available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def applicable(q: torch.Tensor, mask) -> bool:
    from models.s2_pattern import S2Pattern

    return (
        q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and isinstance(mask.pattern, S2Pattern) and mask.causal
    )


def bucket(t: int) -> int:
    """The length a FlexAttention call is padded to: a multiple of FLEX_BLOCK and of an eighth of
    t's power of two (at most ~25% padding), so a run compiles a few shapes per octave of
    lengths instead of one per key length (past the recompile limit torch falls back to eager)."""
    step = max(FLEX_BLOCK, 1 << max(0, t.bit_length() - 3))
    return -(-t // step) * step


def _padded(x: torch.Tensor, n: int, fill: int) -> torch.Tensor:
    """x [..., T] padded to [..., n] with ``fill`` (a document id no real token has)."""
    pad = n - x.shape[-1]
    return x if pad == 0 else torch.cat([x, x.new_full((*x.shape[:-1], pad), fill)], dim=-1)


def mask_mod_for(mask, n_heads: int, n_kv: int, device, tq: int | None = None, tk: int | None = None):
    """The MaskSpec (with its S2 pattern) as a flex_attention mask_mod(b, h, q_idx, kv_idx);
    ``tq`` / ``tk``: padded lengths (padded queries and keys belong to no document)."""
    pat, groups = mask.pattern, n_heads // n_kv
    tq, tk = tq or mask.q_pos.shape[0], tk or mask.k_pos.shape[0]
    qpos, kpos = _padded(mask.q_pos, tq, 0).to(device), _padded(mask.k_pos, tk, 0).to(device)
    qdoc, kdoc = _padded(mask.q_doc, tq, -1).to(device), _padded(mask.k_doc, tk, -2).to(device)
    rows = max(qdoc.shape[0], kdoc.shape[0])  # pattern blocks per row ([1, T] for row blocks)
    qblk = _padded(pat.blocks(mask.q_pos, mask.q_doc), tq, 0).expand(rows, -1).to(device)
    kblk = _padded(pat.blocks(mask.k_pos, mask.k_doc), tk, 0).expand(rows, -1).to(device)
    head = torch.tensor([mask.global_head(h // groups) for h in range(n_heads)], device=device)
    offsets = torch.tensor(pat.offsets, device=device)
    dense = torch.tensor(pat.dense, device=device)
    window, stride, local = mask.window, pat.stride, pat.local

    def mask_mod(b, h, q_idx, kv_idx):
        i, j = qpos[q_idx], kpos[kv_idx]
        ok = (qdoc[b, q_idx] == kdoc[b, kv_idx]) & (j <= i)
        if window is not None:
            ok = ok & (i - j < window)
        bi, bj, hk = qblk[b, q_idx], kblk[b, kv_idx], head[h]
        return ok & (dense[hk] | (bi - bj < local) | ((bj + offsets[hk]) % stride == 0))

    return mask_mod


_BLOCK_MASKS: OrderedDict = OrderedDict()  # (pattern, metadata, shape) -> (metadata tensors, BlockMask)
_BLOCK_MASK_CACHE = 8


def _block_mask(mask, b: int, h: int, hkv: int, tq: int, tk: int, device):
    """The BlockMask of ``mask`` at (padded) lengths tq, tk, built once per pattern, metadata
    and shape: the layers of one batch share their positions / documents tensors and patterns,
    so all but the first reuse it (the entry keeps its tensors alive, so their ids are not recycled)."""
    from torch.nn.attention.flex_attention import create_block_mask

    tensors = (mask.q_pos, mask.k_pos, mask.q_doc, mask.k_doc)
    key = (mask.pattern, mask.causal, mask.window, mask.kv_heads, *map(id, tensors), b, h, hkv, tq, tk, str(device))
    hit = _BLOCK_MASKS.get(key)
    if hit is not None and all(x is y for x, y in zip(hit[0], tensors)):
        _BLOCK_MASKS.move_to_end(key)
        return hit[1]
    mod = mask_mod_for(mask, h, hkv, device, tq, tk)
    # compiled on CUDA: block by block, never the [B, H, Tq, Tk] mask eager construction builds
    cuda = torch.device(device).type == "cuda"
    block_mask = create_block_mask(mod, b, h, tq, tk, device=device, BLOCK_SIZE=FLEX_BLOCK, _compile=cuda)
    _BLOCK_MASKS[key] = (tensors, block_mask)
    while len(_BLOCK_MASKS) > _BLOCK_MASK_CACHE:
        _BLOCK_MASKS.popitem(last=False)
    return block_mask


@functools.cache
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention(q, k, v, mask, scale=None):
    """(o [B, Tq, H, D], lse [B, H, Tq] fp32, -inf where a row sees no key); differentiable on
    CUDA (compiled kernel), forward only on CPU (eager reference of flex_attention)."""
    from torch.nn.attention.flex_attention import flex_attention as eager

    b, tq, h, _ = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    pq, pk = bucket(tq), bucket(tk)  # on CPU too: the tests check the padding
    block_mask = _block_mask(mask, b, h, hkv, pq, pk, q.device)
    fn = _compiled() if q.is_cuda else eager
    qh, kh, vh = (_pad_time(x, n).transpose(1, 2) for x, n in ((q, pq), (k, pk), (v, pk)))
    o, lse = _call_with_lse(fn, qh, kh, vh, block_mask, scale, h != hkv)
    o, lse = o[:, :, :tq], lse[:, :, :tq]
    empty = torch.isnan(o).any(-1) | torch.isinf(lse)  # rows that see no key: 0, never NaN
    o = torch.where(empty[..., None], torch.zeros((), dtype=o.dtype, device=o.device), o)
    lse = lse.float().masked_fill(empty, -float("inf"))
    return o.transpose(1, 2), lse


def _pad_time(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, T, H, D] zero-padded to [B, n, H, D]."""
    return x if x.shape[1] == n else torch.nn.functional.pad(x, (0, 0, 0, 0, 0, n - x.shape[1]))


def _call_with_lse(fn, q, k, v, block_mask, scale, gqa):
    """flex_attention returning (o, lse): ``return_aux=AuxRequest(lse=True)`` where torch has it
    (``return_lse`` is deprecated there), else ``return_lse=True``."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_lse=True)
    o, aux = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_aux=AuxRequest(lse=True))
    return o, aux.lse
