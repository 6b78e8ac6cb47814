"""S2 sparse attention mixer (mixer ``s2``, kind ``sparse``): softmax attention whose core
attention sees, per KV head, only the key blocks of that head's S2 pattern
(models/s2_pattern.py). Same projections, GQA and RoPE as ``softmax``, so a dense (or
Hugging Face) checkpoint loads into it unchanged; with ``model.s2_stride=1`` it *is* the
dense model.

x [B, T, dim] -> q [B, T, H, D], k, v [B, T, Hkv, D] -> ctx.run("sparse", ..., pattern) -> [B, T, dim].
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from models.ops.attention import MaskSpec, attention, attention_ref
from models.ops.documents import causal_pairs
from models.registry import options_of, register_kind, register_mixer, register_options
from models.s2_pattern import DOC_BLOCKS, HEAD_STEPS, check_sparse_options, s2_pattern
from models.softmax_attention import SoftmaxAttention


def _pattern_mask(ctx, pattern, causal, window) -> MaskSpec:
    check_sparse_options(pattern, causal)
    d = ctx.docs
    return MaskSpec(d.index, d.index, d.doc, d.doc, causal, window, pattern)


def local_sparse_attention_ref(q, k, v, ctx, *, pattern=None, causal=True, window=None, scale=None):
    """The naive reference of the sparse kind: dense masked scores, the pattern in the mask."""
    return attention_ref(q, k, v, _pattern_mask(ctx, pattern, causal, window), scale)[0]


@register_kind("sparse", reference=local_sparse_attention_ref)
def local_sparse_attention(q, k, v, ctx, *, pattern=None, causal=True, window=None, scale=None):
    """Block-sparse attention under the per-KV-head ``pattern`` and the document mask of the
    tokens ``ctx`` holds. q [B, T, H, D], k, v [B, T, Hkv, D] -> o [B, T, H, D]."""
    return attention(q, k, v, _pattern_mask(ctx, pattern, causal, window), scale, ctx.block)[0]


@lru_cache(maxsize=4096)
def _density(pattern, seq_len: int) -> float:
    """``pattern.density(seq_len)``, once per (pattern, length): MFU counts it every step."""
    return pattern.density(seq_len)


@register_options("s2")
@dataclass
class S2Options:
    """The settings model.s2_<field> (None there: the default here). Per KV head a strided
    subset of key blocks plus ``local`` local blocks (models/s2_pattern.py). The defaults
    reproduce DKernel's layout (and, with layer_offset 1, Phi-3-small's)."""

    block: int = 64  # tokens per block (>= 16)
    stride: int = 8  # each head sees every stride-th key block (1: dense)
    local: int = 1  # local blocks every head sees (the diagonal block included)
    dense_heads: list[int] = field(default_factory=list)  # KV heads that stay dense
    n_dense_heads: int = 0  # DKernel's num_dense_heads: the last KV heads stay dense
    offsets: list[int] | None = None  # explicit per-KV-head offsets (default h * step + layer offset)
    homogeneous: bool = False  # every head the same offset
    head_step: str = "dkernel"  # dkernel: step max(1, stride // n_heads); spread: max(1, stride // n_kv_heads)
    layer_offset: int | str = 0  # a constant offset for every layer, or "layer": the layer index
    doc_blocks: str = "document"  # document: block indices restart at every document; row: row blocks

    def layer_offset_of(self, layer: int) -> int:
        """The offset of layer ``layer`` (ValueError naming model.s2_layer_offset if malformed)."""
        if self.layer_offset == "layer":
            return layer
        try:
            return int(self.layer_offset)
        except (TypeError, ValueError):
            raise ValueError(
                f"model.s2_layer_offset={self.layer_offset!r} must be an integer (one offset for every "
                "layer, 0 as DKernel, 1 as Phi-3-small) or 'layer' (the layer index)"
            ) from None

    def validate(self, cfg) -> None:
        if self.local < 1:
            raise ValueError(f"model.s2_local={self.local} must be >= 1 (every token sees its own block)")
        if self.head_step not in HEAD_STEPS:
            raise ValueError(f"model.s2_head_step={self.head_step!r} must be one of {HEAD_STEPS}")
        if self.doc_blocks not in DOC_BLOCKS:
            raise ValueError(f"model.s2_doc_blocks={self.doc_blocks!r} must be one of {DOC_BLOCKS}")
        self.layer_offset_of(0)
        if any(mixer_uses_s2(m) for m in cfg.mixer_pattern):  # builds (and checks) the pattern; warns
            layer_pattern(cfg, 0)  # if heads leave blocks unseen


def mixer_uses_s2(name: str) -> bool:
    from models.registry import mixer_class

    return issubclass(mixer_class(name), S2Attention)


def layer_pattern(cfg, layer: int, check_coverage: bool = True):
    """The S2 pattern of layer ``layer`` from the model.s2_* settings (layer offset: constant,
    0 by default, or the layer index with model.s2_layer_offset=layer)."""
    o = options_of(cfg, "s2")
    return s2_pattern(
        block=o.block,
        stride=o.stride,
        local=o.local,
        n_kv_heads=cfg.n_kv_heads,
        n_heads=cfg.n_heads,
        head_step=o.head_step,
        layer_offset=o.layer_offset_of(layer),
        offsets=o.offsets,
        dense_heads=tuple(o.dense_heads),
        n_dense_heads=o.n_dense_heads,
        homogeneous=o.homogeneous,
        doc_blocks=o.doc_blocks,
        check_coverage=check_coverage,
    )


@register_mixer("s2")
class S2Attention(SoftmaxAttention):
    kind = "sparse"
    hf_attention = True  # Hugging Face attention weights; the pattern goes into config.json

    @staticmethod
    def core_flops(cfg, layer: int, doc_lens) -> float:
        """Each document's dense count (causal, windowed) scaled by the layer pattern's block
        density over a row of the document's length (exact at block level for per-document
        blocks; an estimate for row blocks, where a document not starting at a block boundary
        meets the pattern's blocks shifted)."""
        pattern = layer_pattern(cfg, layer, False)
        per_pair = 12 * cfg.n_heads * cfg.hd
        counts = Counter(int(n) for n in doc_lens)
        return sum(
            per_pair * causal_pairs([n], cfg.sliding_window) * k * _density(pattern, n) for n, k in counts.items()
        )

    def __init__(self, cfg, layer: int):
        super().__init__(cfg, layer)
        self.pattern = layer_pattern(cfg, layer, check_coverage=False)  # ModelConfig.validate warns once

    def core_options(self) -> dict:
        return dict(causal=True, window=self.window, pattern=self.pattern)
