"""flash-attn dispatch for the block-sparse attention interface (CUDA, fp16/bf16).

Used by ``models.ops.attention.attention`` when flash-attn is installed, the tensors are on
CUDA in half precision, the GPU and head dim suit flash-attn 2 (compute capability >= 8.0,
head dim <= 256 and a multiple of 8; otherwise the PyTorch path), and the (Q, K) pair is the
*same* run of consecutive positions (single-device attention, Ulysses' full rows). Packed documents
become flash-attn varlen sequences (one per document piece of the flattened batch); a
sliding window becomes ``window_size=(window - 1, 0)``. Every other pair (a Q chunk against
K from elsewhere in the row) falls back to the PyTorch path.

Shapes: q [B, T, H, D], k, v [B, T, Hkv, D]; flash-attn takes [B*T, H, D] with cu_seqlens.
"""

from __future__ import annotations

import functools

import torch

from models.ops.documents import cu_seqlens_from_doc_ids

MAX_HEAD_DIM = 256  # flash-attn 2's kernels; head dims must also be a multiple of 8
MIN_CAPABILITY = (8, 0)  # Ampere and newer


@functools.cache
def available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_ok(q: torch.Tensor) -> bool:
    """flash-attn runs q [.., D] here: CUDA, fp16 / bf16, head dim <= 256 and a multiple of 8,
    compute capability >= 8.0 (otherwise the PyTorch path runs; flash-attn would raise)."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return False
    d = q.shape[-1]
    if d > MAX_HEAD_DIM or d % 8:
        return False
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    return _capability(index) >= MIN_CAPABILITY


def applicable(q: torch.Tensor, mask) -> bool:
    """flash-attn's varlen call holds documents, causality and a window only: a block pattern or
    a mask given as slices (prefix-LM, shared question, ...) takes the PyTorch path."""
    if mask.pattern is not None or mask.slices is not None or not device_ok(q):
        return False
    pos = mask.q_pos
    if pos.numel() != mask.k_pos.numel() or not torch.equal(pos, mask.k_pos):
        return False
    return bool((pos[1:] - pos[:-1] == 1).all()) and torch.equal(mask.q_doc, mask.k_doc)


def flash_attention(q, k, v, mask, scale):
    """(o [B, T, H, D], lse [B, H, T] fp32); differentiable in q, k, v via flash-attn."""
    from flash_attn import flash_attn_varlen_func

    b, t, h, d = q.shape
    # from the mask's host-side document ids: no device nonzero, no device-to-host read of max
    cu_cpu = cu_seqlens_from_doc_ids(mask.q_doc.cpu())
    max_len = int((cu_cpu[1:] - cu_cpu[:-1]).max())
    cu = cu_cpu.to(torch.int32).to(q.device, non_blocking=True)
    if mask.window is None:
        window = (-1, -1)
    else:
        window = (mask.window - 1, 0 if mask.causal else mask.window - 1)
    out, lse, _ = flash_attn_varlen_func(
        q.reshape(b * t, h, d),
        k.reshape(b * t, -1, d),
        v.reshape(b * t, -1, d),
        cu,
        cu,
        max_len,
        max_len,
        dropout_p=0.0,
        softmax_scale=scale,
        causal=mask.causal,
        window_size=window,
        return_attn_probs=True,
    )
    return out.view(b, t, h, d), lse.view(h, b, t).transpose(0, 1).float()
