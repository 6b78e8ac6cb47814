"""Block-sparse softmax attention that returns the log-sum-exp, in plain PyTorch.

Shapes (one layout everywhere):
    q        [B, Tq, H, D]       queries
    k, v     [B, Tk, Hkv, D]     keys / values, H % Hkv == 0 (GQA)
    mask     MaskSpec            positions [Tq], [Tk] and document ids [B, Tq], [B, Tk]
    o        [B, Tq, H, D]
    lse      [B, H, Tq]  fp32/fp64, -inf where a query row sees no key

Files:
    plan.py      MaskSpec (which pairs are allowed), the span plan and the tile plan
    dense.py     masks without a block pattern: fused CPU flash pieces and band tiles
    pattern.py   masks with a per-KV-head block pattern (S2): active tiles only
    naive.py     ``attention_ref``, the dense reference (autograd)
    here         ``attention_forward`` / ``attention_backward`` (the path by mask), the
                 autograd function, and ``attention`` (flash-attn / FlexAttention on CUDA)

Backward recomputes probabilities from the saved lse (flash-attention style), so a CP
strategy can call :func:`attention_backward` with the *merged* output and lse of several
blocks and get exact per-block gradients.
"""

from __future__ import annotations

import torch

from models.ops.attention.dense import dense_backward, dense_forward
from models.ops.attention.naive import attention_ref
from models.ops.attention.pattern import pattern_backward, pattern_forward
from models.ops.attention.plan import (
    DEFAULT_BLOCK,
    MaskSpec,
    Piece,
    active_blocks,
    block_candidates,
    check_inputs,
    check_mask,
    head_groups,
    may_attend,
    patterned,
    planned_pairs,
    span_plan,
    tile_candidates,
    tile_plan,
)
from models.ops.common import no_autocast

__all__ = [
    "DEFAULT_BLOCK",
    "MaskSpec",
    "Piece",
    "active_blocks",
    "attention",
    "attention_backward",
    "attention_forward",
    "attention_ref",
    "block_candidates",
    "check_inputs",
    "check_mask",
    "head_groups",
    "may_attend",
    "planned_pairs",
    "span_plan",
    "tile_candidates",
    "tile_plan",
]


@no_autocast
def attention_forward(
    q, k, v, mask: MaskSpec, scale: float | None = None, block: int = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (o [B, Tq, H, D] in q.dtype, lse [B, H, Tq] in fp32 or fp64). Masks with a
    per-head block pattern (S2) run the pattern's tile plan, all others the span plan."""
    if patterned(mask):
        return pattern_forward(q, k, v, mask, scale, block)
    return dense_forward(q, k, v, mask, scale, block)


@no_autocast
def attention_backward(do, q, k, v, o, lse, mask: MaskSpec, scale: float | None = None, block: int = DEFAULT_BLOCK):
    """Gradients (dq, dk, dv) of ``o`` for one (Q, K) block pair, recomputed from ``lse``.

    ``o`` and ``lse`` may be the merged output / lse over several key chunks (ring
    attention): then the returned gradients are this key chunk's exact share (every path
    uses the given lse and delta = rowsum(do * o), never its own normalisation).
    """
    if patterned(mask):
        return pattern_backward(do, q, k, v, o, lse, mask, scale, block)
    return dense_backward(do, q, k, v, o, lse, mask, scale, block)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(fctx, q, k, v, mask, scale, block):
        o, lse = attention_forward(q, k, v, mask, scale, block)
        fctx.save_for_backward(q, k, v, o, lse)
        fctx.mask, fctx.scale, fctx.block = mask, scale, block
        fctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(fctx, do, _dlse):
        q, k, v, o, lse = fctx.saved_tensors
        dq, dk, dv = attention_backward(do, q, k, v, o, lse, fctx.mask, fctx.scale, fctx.block)
        return dq, dk, dv, None, None, None


def attention(
    q, k, v, mask: MaskSpec, scale: float | None = None, block: int = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable block-sparse attention. Returns (o, lse); lse carries no gradient.
    On CUDA in half precision with flash-attn installed, same-run pairs use flash-attn; masks
    with an S2 pattern use FlexAttention (models/ops/flex.py)."""
    if q.is_cuda:
        from models.ops import flash, flex

        if flash.available() and flash.applicable(q, mask):
            return flash.flash_attention(q, k, v, mask, scale)
        if flex.available() and flex.applicable(q, mask):  # S2 patterns: FlexAttention BlockMask
            return flex.flex_attention(q, k, v, mask, scale)
    return _Attention.apply(q, k, v, mask, scale, block)
