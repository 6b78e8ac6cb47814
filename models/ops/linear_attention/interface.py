"""One entry point for mixers and contexts: linear attention over packed documents.

    q, k [B, T, H, Dk], v [B, T, H, Dv], g [B, T, H], gk [B, T, H, Dk],
    cu_seqlens [n_docs + 1] (document starts over the flattened [B * T] batch; None: one per row)
    -> o [B, T, H, Dv]
impl (``model.linear_impl``): "auto" (fla's Triton kernels for CUDA tensors when fla is
importable, else the chunked torch op), "chunk" (always the torch op), "naive" (token-by-token
reference, for tests), "fla" (always fla's kernels: CUDA, or Triton's CPU interpreter in the
tests). ``chunk_linear_attention`` takes the same words but "naive".
"""

from __future__ import annotations

import torch

from models.ops.linear_attention.chunk import chunk_linear_attention
from models.ops.linear_attention.naive import recurrent_linear_attention_ref

IMPLS = ("auto", "chunk", "fla", "naive")


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"model.linear_impl={impl!r} is unknown: choose one of {IMPLS}")


def runs_torch_chunk(impl: str, x: torch.Tensor) -> bool:
    """Whether ``impl`` runs the chunked torch op on tensors like ``x`` (not the reference,
    not fla's kernels), i.e. whether its hand-written forward / backward are available."""
    check_impl(impl)
    if impl != "auto":
        return impl == "chunk"
    from models.ops.linear_attention import fla_backend

    return not (x.is_cuda and fla_backend.available())


def linear_attention(
    q,
    k,
    v,
    g=None,
    gk=None,
    scale: float = 1.0,
    *,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    impl: str = "auto",
) -> torch.Tensor:
    """The state restarts at every document start of ``cu_seqlens`` and at every row start."""
    check_impl(impl)
    if impl == "naive":
        cu = None if cu_seqlens is None else cu_seqlens.to(q.device)
        return recurrent_linear_attention_ref(q, k, v, g, gk, scale, cu_seqlens=cu)[0]
    # cu_seqlens as given (host-side from the batch): the ops move what they need themselves
    return chunk_linear_attention(q, k, v, g, gk, scale, cu_seqlens=cu_seqlens, chunk_size=chunk_size, impl=impl)[0]
