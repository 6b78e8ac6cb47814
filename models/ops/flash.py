"""flash-attn dispatch for the block-sparse attention interface (CUDA, fp16/bf16).

Used by ``models.ops.attention.attention`` when flash-attn is installed, the tensors are on
CUDA in half precision, and the (Q, K) pair is the *same* run of consecutive positions
(single-device attention, Ulysses' full rows). Packed documents
become flash-attn varlen sequences (one per document piece of the flattened batch); a
sliding window becomes ``window_size=(window - 1, 0)``. Every other pair (a Q chunk against
K from elsewhere in the row) falls back to the PyTorch path.

Shapes: q [B, T, H, D], k, v [B, T, Hkv, D]; flash-attn takes [B*T, H, D] with cu_seqlens.
"""

from __future__ import annotations

import torch

from models.ops.documents import cu_seqlens_from_doc_ids


def available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def applicable(q: torch.Tensor, mask) -> bool:
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)) or mask.pattern is not None:
        return False
    pos = mask.q_pos
    if pos.numel() != mask.k_pos.numel() or not torch.equal(pos, mask.k_pos):
        return False
    return bool((pos[1:] - pos[:-1] == 1).all()) and torch.equal(mask.q_doc, mask.k_doc)


def flash_attention(q, k, v, mask, scale):
    """(o [B, T, H, D], lse [B, H, T] fp32); differentiable in q, k, v via flash-attn."""
    from flash_attn import flash_attn_varlen_func

    b, t, h, d = q.shape
    cu = cu_seqlens_from_doc_ids(mask.q_doc.to(q.device)).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
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
