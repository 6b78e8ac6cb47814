"""The attention context: how a token mixer reaches its core attention.

A mixer never knows whether it runs on one device or under context parallelism: it calls
``ctx.run(kind, q, k, v, **options)`` with its *local* tokens and gets the output for them.
Kinds and their options:

    softmax   q [B, T, H, D], k, v [B, T, Hkv, D]; causal, window, scale, mask (a SliceMask
              over the global row replacing the documents mask, or a MaskRecipe built per batch
              by ``slice_mask``: ops/attention/slices.py; without one, the batch's data mask
              ``batch_mask`` when the data carries one: ops/attention/segments.py)
                                                                            -> o [B, T, H, D]
    linear    q, k [B, T, H, Dk], v [B, T, H, Dv]; g [B, T, H], gk [B, T, H, Dk], scale,
              chunk_size, impl                                              -> o [B, T, H, Dv]
    sparse    q [B, T, H, D], k, v [B, T, Hkv, D]; pattern (per-KV-head block pattern,
              models/s2_pattern.py), causal (True only), window, scale      -> o [B, T, H, D]

``attention`` and ``linear_attention`` are the same calls spelled for the two first kinds.
The single-device context lives here; context-parallel ones are built in ``parallel/`` and
follow the same protocol (they hold the same ``docs`` for their local tokens).
"""

from __future__ import annotations

import torch

from models.ops.attention.slices import SliceMask
from models.ops.documents import Documents
from models.registry import local_op


class AttentionContext:
    """Base of every context: ``docs`` (models.ops.documents.Documents of the local tokens,
    computed once per batch) and ``block`` (softmax kernel block size); subclasses may route
    kinds elsewhere by overriding ``run``."""

    docs: Documents
    block: int
    cu_seqlens: torch.Tensor | None  # global document starts over the flattened [B * N] batch
    batch_size: int
    seq_len: int  # N, the global row length
    batch_mask = None  # the batch's data mask (data.mask, ops/attention/segments.py SegmentMask) or None

    def run(self, kind: str, q, k, v, **options) -> torch.Tensor:
        return local_op(kind)(q, k, v, self, **self.bind(options, kind))

    def bind(self, options: dict, kind: str | None = None) -> dict:
        """The options of a ``ctx.run`` call for this batch: a per-document block pattern
        (models/s2_pattern.py) learns the batch's document starts, once per batch; a softmax
        call without a mask of its own gets the batch's data mask (``batch_mask``)."""
        from models.s2_pattern import bind_pattern

        if kind == "softmax" and self.batch_mask is not None and options.get("mask") is None:
            if options.get("window") is not None:
                raise ValueError(
                    f"data.mask={self.batch_mask.name} and a sliding window (model.sliding_window or a "
                    "windowed mixer) both mask softmax attention: drop one"
                )
            options = {**options, "mask": self.batch_mask}
        return bind_pattern(options, self.docs, self.cu_seqlens, self.batch_size, self.seq_len)

    def slice_mask(self, mask, n_heads: int):
        """A configured mask (``MaskRecipe``, model.mask) as the SliceMask of this batch (built
        once per batch and head count, from ``batch_size``, ``seq_len`` and the global
        ``cu_seqlens``); a SliceMask or None is returned as it is."""
        if mask is None or isinstance(mask, SliceMask):
            return mask
        cache = self.__dict__.setdefault("_slice_masks", {})
        if (mask, n_heads) not in cache:
            cache[(mask, n_heads)] = mask.build(self.batch_size, self.seq_len, self.cu_seqlens, n_heads)
        return cache[(mask, n_heads)]

    def attention(self, q, k, v, *, causal=True, window=None, scale=None):
        """q [B, T, H, D], k, v [B, T, Hkv, D] -> o [B, T, H, D]."""
        return self.run("softmax", q, k, v, causal=causal, window=window, scale=scale)

    def linear_attention(self, q, k, v, *, g=None, gk=None, scale=1.0, **options):
        """q, k [B, T, H, Dk], v [B, T, H, Dv], g [B, T, H], gk [B, T, H, Dk] -> o [B, T, H, Dv]."""
        return self.run("linear", q, k, v, g=g, gk=gk, scale=scale, **options)


class SingleDeviceContext(AttentionContext):
    """All tokens on one device. ``cu_seqlens`` holds the document start offsets of the
    flattened batch ([B * T] tokens, ending with B * T); None means one document per row.
    ``batch_mask``: the batch's data mask (a SegmentMask), or None."""

    def __init__(
        self, batch_size: int, seq_len: int, cu_seqlens: torch.Tensor | None = None, block: int = 256, batch_mask=None
    ):
        self.block, self.batch_mask = block, batch_mask
        self.batch_size, self.seq_len = batch_size, seq_len
        self.docs = Documents.of(cu_seqlens, batch_size, seq_len)
        self.cu_seqlens = self.docs.cu_seqlens
