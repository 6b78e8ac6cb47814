"""Lizard (Van Nguyen et al. 2025, "Lizard: An Efficient Linearization Framework for LLMs"):
gated linear attention for global context plus sliding-window attention with learned
meta-memory tokens that every query sees, in one layer (mixer ``lizard``, kinds ``linear`` and
``meta_window``). No public code was found; this follows the paper's description:

    linear       hedgehog feature maps of the RoPE'd q, k (as LoLCATs), a data-dependent per-key
                 gate gk = logsigmoid(W_up W_down x) / 16 (GLA's low-rank gate, the "gating
                 module"), normalised by the decayed sum of the keys (a ones column of v)
    meta_window  one softmax over the last W keys (self included, same document) and M learned
                 meta tokens (K/V parameters [M, Hkv, D], no position: not rotated)
    o = 0.5 o_linear + 0.5 o_meta_window   (the combination is not fixed by the text at hand:
                 Liger's equal weights, a deliberate choice)

Under CP the meta tokens' K/V are replicated (every rank holds the parameters and every query
sees all M; their gradient is each rank's share, summed by data parallelism like any weight),
never sharded; the window keys come from the ranks that hold them
(parallel/strategies/gather_keys.py). Shapes: x [B, T, dim]; q [B, T, H, D]; k, v [B, T, Hkv, D].
Settings: model.hybrid_window (W) and model.hybrid_meta_tokens (M); the gate's rank and
normaliser are model.linear_gate_low_rank / linear_gate_normalizer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.hybrid_attention import LolcatsAttention, _TwoKind
from models.linear_attention import FeatureMap
from models.ops.attention import MaskSpec, attention_backward, attention_forward, check_inputs
from models.ops.common import acc_dtype, no_autocast
from models.registry import options_of, register_kind, register_mixer
from models.rope import apply_rotary


def meta_window_ref(q, k, v, q_index, q_doc, k_index, k_doc, *, window, meta_k, meta_v, scale=None):
    """The naive reference: o [B, Tq, H, D], one dense softmax over the keys k [B, Tk, Hkv, D] at
    row positions ``k_index`` in query i's window (0 <= i - j < window, same document) together
    with the meta tokens meta_k, meta_v [M, Hkv, D]; [B, H, Tq, Tk] scores (autograd)."""
    b, tq, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    g = h // k.shape[2]
    kr, vr = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    mk, mv = meta_k.repeat_interleave(g, dim=1), meta_v.repeat_interleave(g, dim=1)  # [M, H, D]
    dist = q_index[:, None] - k_index[None, :]
    ok = (q_doc[:, :, None] == k_doc[:, None, :]) & ((dist >= 0) & (dist < window))[None]  # [B, Tq, Tk]
    s = torch.einsum("bihd,bjhd->bhij", q, kr) * scale
    s = s.masked_fill(~ok[:, None], -math.inf)
    sm = torch.einsum("bihd,mhd->bhim", q, mk.to(q.dtype)) * scale  # [B, H, Tq, M]
    p = torch.cat([s, sm], dim=-1).softmax(-1)
    pw, pm = p.split([s.shape[-1], sm.shape[-1]], dim=-1)
    return torch.einsum("bhij,bjhd->bihd", pw, vr) + torch.einsum("bhim,mhd->bihd", pm, mv.to(q.dtype))


def _per_query_head(meta: torch.Tensor, n_heads: int, dtype) -> torch.Tensor:
    """Meta tokens [M, Hkv, D] -> [M, H, D] in ``dtype``: each KV head's for its query heads (GQA)."""
    return meta.to(dtype).repeat_interleave(n_heads // meta.shape[1], dim=1)


@no_autocast
def _meta_scores(q, meta_k, scale):
    """Scores of every query against the meta tokens, [B, H, Tq, M] in the accumulation dtype."""
    acc = acc_dtype(q)
    return torch.einsum("bihd,mhd->bhim", q.to(acc), _per_query_head(meta_k, q.shape[2], acc)) * scale


class _MetaWindow(torch.autograd.Function):
    """The window keys through the softmax kernel (``attention_forward``: only the pairs the
    window allows, O(Tq x W)), the M meta tokens as a dense [Tq, M] softmax, merged by log-sum-exp.
    Backward hands the kernel the *merged* output and lse (its exact share of the gradients) and
    differentiates the meta part against the same lse: no [Tq, Tk] tensor anywhere."""

    @staticmethod
    def forward(fctx, q, k, v, meta_k, meta_v, mask, scale):
        o_w, lse_w = attention_forward(q, k, v, mask, scale)  # [B, Tq, H, D], [B, H, Tq]
        with torch.autocast(q.device.type, enabled=False):  # the merge in the accumulation dtype
            sm = _meta_scores(q, meta_k, scale)
            lse = torch.logaddexp(lse_w, torch.logsumexp(sm, -1))  # finite: every query sees M >= 1 tokens
            mv = _per_query_head(meta_v, q.shape[2], sm.dtype)
            o = o_w.to(sm.dtype) * torch.exp(lse_w - lse).transpose(1, 2).unsqueeze(-1)
            o = (o + torch.einsum("bhim,mhd->bihd", torch.exp(sm - lse.unsqueeze(-1)), mv)).to(q.dtype)
        fctx.save_for_backward(q, k, v, meta_k, meta_v, o, lse)
        fctx.mask, fctx.scale = mask, scale
        return o

    @staticmethod
    def backward(fctx, do):
        q, k, v, meta_k, meta_v, o, lse = fctx.saved_tensors
        dq, dk, dv = attention_backward(do, q, k, v, o, lse, fctx.mask, fctx.scale)
        with torch.autocast(q.device.type, enabled=False):
            sm = _meta_scores(q, meta_k, fctx.scale)
            acc, g, hkv = sm.dtype, q.shape[2] // meta_k.shape[1], meta_k.shape[1]
            p = torch.exp(sm - lse.unsqueeze(-1))  # [B, H, Tq, M]
            doa, qa = do.to(acc), q.to(acc)
            mv, mk = (_per_query_head(x, q.shape[2], acc) for x in (meta_v, meta_k))
            delta = (doa * o.to(acc)).sum(-1).transpose(1, 2).unsqueeze(-1)  # [B, H, Tq, 1]
            ds = p * (torch.einsum("bihd,mhd->bhim", doa, mv) - delta)
            dq = dq.to(acc) + torch.einsum("bhim,mhd->bihd", ds, mk) * fctx.scale
            dmk = torch.einsum("bhim,bihd->mhd", ds, qa) * fctx.scale
            dmv = torch.einsum("bhim,bihd->mhd", p, doa)
            m, d = dmk.shape[0], dmk.shape[-1]
            dmk, dmv = (x.view(m, hkv, g, d).sum(2) for x in (dmk, dmv))  # GQA: the group's sum
        return dq.to(q.dtype), dk, dv, dmk.to(meta_k.dtype), dmv.to(meta_v.dtype), None, None


def meta_window_core(q, k, v, q_index, q_doc, k_index, k_doc, *, window, meta_k, meta_v, scale=None):
    """o [B, Tq, H, D]: softmax over the keys k [B, Tk, Hkv, D] at row positions ``k_index`` in
    query i's window (0 <= i - j < window, same document) together with the meta tokens
    meta_k, meta_v [M, Hkv, D]. Memory and work O(Tq x W + Tq x M) (``_MetaWindow``); the
    dense formulation is ``meta_window_ref``."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = MaskSpec(q_index, k_index, q_doc, k_doc, True, window)
    return _MetaWindow.apply(q, k, v, meta_k, meta_v, mask, scale)


def _on_local_tokens(core):
    """The kind's single-device op (q, k, v, ctx, ...) -> o running ``core`` over the tokens
    ``ctx`` holds: ``meta_window_core`` (the op) or ``meta_window_ref`` (its reference)."""

    def op(q, k, v, ctx, *, window, meta_k, meta_v, scale=None):
        check_inputs(q, k, window)
        d = ctx.docs
        return core(q, k, v, d.index, d.doc, d.index, d.doc, window=window, meta_k=meta_k, meta_v=meta_v, scale=scale)

    return op


register_kind("meta_window", reference=_on_local_tokens(meta_window_ref))(_on_local_tokens(meta_window_core))


@register_mixer("lizard")
class LizardAttention(_TwoKind):
    """Lizard: gated hedgehog linear attention + sliding window with meta-memory tokens."""

    kinds = ("linear", "meta_window")
    state_dims = LolcatsAttention.state_dims  # hedgehog features by the values and the normaliser

    @classmethod
    def calls(cls, cfg) -> list[dict]:
        """The window over meta tokens and K/V; the gated linear branch over 2 D features with
        D + 1 values (numerator and normaliser)."""
        h, hkv, d, w = cfg.n_heads, cfg.n_kv_heads, cfg.hd, options_of(cfg, "hybrid").window
        return [
            dict(kind="meta_window", n_heads=h, n_kv_heads=hkv, head_dim=d, window=w),
            dict(kind="linear", n_heads=h, n_kv_heads=h, head_dim=d + 1, key_dim=2 * d),
        ]

    def __init__(self, cfg, layer: int):
        super().__init__(cfg, layer)
        self.q_map = FeatureMap("hedgehog", self.h, self.d)
        self.k_map = FeatureMap("hedgehog", self.h, self.d)
        rank = int(options_of(cfg, "linear").gate_low_rank)
        self.gate_down = nn.Linear(cfg.dim, rank, bias=False)
        self.gate_up = nn.Linear(rank, self.h * self.q_map.out_dim, bias=True)
        m = int(options_of(cfg, "hybrid").meta_tokens)
        self.meta_k = nn.Parameter(torch.randn(m, self.n_kv, self.d) * cfg.init_std)
        self.meta_v = nn.Parameter(torch.randn(m, self.n_kv, self.d) * cfg.init_std)

    def forward(self, x, cos, sin, ctx):
        b, t, _ = x.shape
        q, k, v = self.qkv(x)
        qr, kr = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o_win = ctx.run("meta_window", qr, kr, v, window=self.window, meta_k=self.meta_k, meta_v=self.meta_v)
        fq, fk = self.q_map(qr), self.k_map(self.repeat_kv(kr))  # [B, T, H, 2D]
        gk = F.logsigmoid(self.gate_up(self.gate_down(x))).view(b, t, self.h, -1) / self.normalizer
        vr = self.repeat_kv(v)
        v1 = torch.cat([vr, torch.ones_like(vr[..., :1])], dim=-1)  # numerator and denominator
        o1 = ctx.run("linear", fq, fk, v1, gk=gk, scale=1.0, chunk_size=self.chunk_size, impl=self.impl)
        o_lin = o1[..., : self.d] / o1[..., self.d :]
        return self.out(0.5 * o_lin + 0.5 * o_win)
