"""One entry point for mixers and contexts: linear attention over tokens labelled by document id.

    q, k [B, T, H, Dk], v [B, T, H, Dv], g [B, T, H], gk [B, T, H, Dk], doc [B, T]
    -> o [B, T, H, Dv]
impl: "auto" (fla's Triton kernels for CUDA tensors when fla is importable, else the chunked
torch op), "chunk" (always the torch op), "naive" (token-by-token reference, for tests).
"""
from __future__ import annotations

import torch

from models.ops.linear_attention.chunk import chunk_linear_attention
from models.ops.linear_attention.naive import recurrent_linear_attention_ref
from models.ops.linear_attention.segments import cu_seqlens_from_doc_ids

IMPLS = ("auto", "chunk", "naive")


def doc_linear_attention(q, k, v, doc: torch.Tensor, g=None, gk=None, scale: float = 1.0, *,
                         chunk_size: int = 64, impl: str = "auto") -> torch.Tensor:
    """The state restarts wherever the document id changes and at every row start."""
    if impl not in IMPLS:
        raise ValueError(f"linear_impl={impl!r}: choose one of {IMPLS}")
    cu = cu_seqlens_from_doc_ids(doc).to(q.device)
    if impl == "naive":
        return recurrent_linear_attention_ref(q, k, v, g, gk, scale, cu_seqlens=cu)[0]
    backend = "auto" if impl == "auto" else "torch"
    return chunk_linear_attention(q, k, v, g, gk, scale, cu_seqlens=cu, chunk_size=chunk_size,
                                  backend=backend)[0]
