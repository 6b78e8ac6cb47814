"""Softmax attention mixer (kind ``softmax``): GQA, RoPE, optional sliding window.

x [B, T, dim] -> q [B, T, H, D], k, v [B, T, Hkv, D] -> ctx.run("softmax") -> [B, T, dim].
"""

from __future__ import annotations

from torch import nn

from models.ops.attention import MaskSpec, attention, attention_ref, check_inputs, check_mask
from models.ops.attention.slices import MaskRecipe
from models.ops.documents import causal_pairs
from models.registry import register_kind, register_mixer
from models.rope import apply_rotary


def _doc_mask(ctx, causal, window, pattern=None, mask=None, q=None) -> MaskSpec:
    d = ctx.docs
    if mask is not None:  # a SliceMask (or a configured recipe): it replaces the documents mask
        mask = ctx.slice_mask(mask, q.shape[2])
        check_mask(mask, q, q.shape[0], q.shape[1], causal, window)
        return MaskSpec(d.index, d.index, slices=mask)
    return MaskSpec(d.index, d.index, d.doc, d.doc, causal, window, pattern)


def local_softmax_attention_ref(q, k, v, ctx, *, causal=True, window=None, scale=None, mask=None):
    """The naive reference of the softmax kind: the dense [B, H, T, T] masked scores."""
    check_inputs(q, k, window)
    return attention_ref(q, k, v, _doc_mask(ctx, causal, window, mask=mask, q=q), scale)[0]


@register_kind("softmax", reference=local_softmax_attention_ref)
def local_softmax_attention(q, k, v, ctx, *, causal=True, window=None, scale=None, mask=None):
    """Block-sparse attention over the tokens ``ctx`` holds, under their document mask (or the
    ``SliceMask`` ``mask``, models/ops/attention/slices.py). q [B, T, H, D], k, v [B, T, Hkv, D]
    -> o [B, T, H, D]."""
    check_inputs(q, k, window)
    return attention(q, k, v, _doc_mask(ctx, causal, window, mask=mask, q=q), scale, ctx.block)[0]


@register_mixer("softmax")
class SoftmaxAttention(nn.Module):
    kind = "softmax"
    hf_attention = True  # same projections as Hugging Face Llama attention (import/export)

    @staticmethod
    def core_flops(cfg, layer: int, doc_lens) -> float:
        """FLOPs (fwd+bwd) of this layer's core attention over packed documents of lengths
        ``doc_lens``, from the mask (MFU accounting): 12 * H * D per (query, key) pair it allows
        (scores and values 4 * H * D forward, twice that backward), pairs per document causal
        and clipped by the sliding window, never across documents."""
        return 12 * cfg.n_heads * cfg.hd * causal_pairs(doc_lens, cfg.sliding_window)

    def __init__(self, cfg, layer: int):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.hd
        self.window = cfg.sliding_window
        self.mask = MaskRecipe.of(cfg.mask, cfg.mask_args) if cfg.mask else None  # built per batch by ctx
        self.q_proj = nn.Linear(cfg.dim, self.n_heads * self.hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.dim, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.dim, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.dim, bias=False)

    def core_options(self) -> dict:
        """The options of this mixer's ``ctx.run`` call (subclasses add theirs, e.g. S2's pattern)."""
        if self.mask is not None:
            return dict(causal=True, mask=self.mask)
        return dict(causal=True, window=self.window)

    def forward(self, x, cos, sin, ctx):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.hd)
        k = self.k_proj(x).view(b, t, self.n_kv, self.hd)
        v = self.v_proj(x).view(b, t, self.n_kv, self.hd)
        # memory layouts (shapes stay [B, T, H, D]): k and v heads-first, the layout the attention
        # kernels read fastest (the fused CPU op: ~4% in bf16), q token-major, so the output
        # (laid out like q) reaches o_proj as a view of the storage attention saves anyway
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin, heads_first=True)
        v = v.transpose(1, 2).contiguous().transpose(1, 2)  # the projection's output is then freed
        o = ctx.run(self.kind, q, k, v, **self.core_options())
        return self.o_proj(o.reshape(b, t, self.n_heads * self.hd))
