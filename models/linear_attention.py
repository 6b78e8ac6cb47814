"""Linear-attention token mixers: linear, lightning, retention, simple_gla, gla.

x [B, T, dim] -> q, k [B, T, H, Dk], v [B, T, H, D], log-decay g [B, T, H] or gk [B, T, H, Dk]
-> ctx.run("linear") -> o [B, T, H, D] -> per-head norm, gate
-> [B, T, dim].  H = n_heads for q, k and v alike (no GQA for linear mixers; n_kv_heads is
ignored), D = cfg.hd, Dk = D (2 D for the hedgehog feature map).

Options are read with getattr(cfg, name, None) (None -> the mixer's default):
    linear_feature_map   identity | relu | elu1 | silu | learnable | hedgehog
    linear_output_norm   bool, RMSNorm per head (retention: group norm per head)
    linear_output_gate   bool, o * silu(W_gate x)
    linear_rope          bool, rotate q, k with the model's RoPE (before the feature map)
    linear_normalize     bool, o_t = phi(q_t) S_t / (phi(q_t) z_t), z_t = sum of phi(k) (decayed
                         alike): v gets a ones column [B, T, H, D+1], so every CP strategy serves it
    linear_chunk_size    int (64)
    linear_impl          auto | chunk | naive (naive = token-by-token reference, for tests)
    linear_gate_normalizer  float (16), simple_gla / gla: g = logsigmoid(W x) / normalizer
    linear_gate_low_rank    int (16), gla: rank of the decay projection
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.ops.common import acc_dtype
from models.ops.linear_attention import linear_attention
from models.registry import register_kind, register_mixer
from models.rope import apply_rotary


@register_kind("linear")
def local_linear_attention(q, k, v, ctx, *, g=None, gk=None, scale=1.0, chunk_size=64, impl="auto"):
    """Linear attention over the tokens ``ctx`` holds, the state restarting at every document.
    q, k [B,T,H,Dk], v [B,T,H,Dv], g [B,T,H], gk [B,T,H,Dk] -> o [B,T,H,Dv]."""
    return linear_attention(q, k, v, g, gk, scale, cu_seqlens=ctx.docs.cu_seqlens, chunk_size=chunk_size, impl=impl)


def _option(cfg, name: str, default):
    """cfg.<name> when the config has it and it is not None, else the mixer's default."""
    value = getattr(cfg, name, None)
    return default if value is None else value


class FeatureMap(nn.Module):
    """phi applied to q or k per head: [B, T, H, D] -> [B, T, H, Dk]."""

    def __init__(self, kind: str, n_heads: int, head_dim: int):
        super().__init__()
        if kind not in ("identity", "relu", "elu1", "silu", "learnable", "hedgehog"):
            raise ValueError(f"linear_feature_map={kind!r}: choose identity, relu, elu1, silu, learnable or hedgehog")
        self.kind = kind
        self.out_dim = 2 * head_dim if kind == "hedgehog" else head_dim
        if kind in ("learnable", "hedgehog"):  # per-head linear map (LoLCATs / Hedgehog)
            self.weight = nn.Parameter(torch.eye(head_dim).repeat(n_heads, 1, 1))

    def forward(self, x):
        if self.kind == "identity":
            return x
        if self.kind == "relu":
            return F.relu(x)
        if self.kind == "elu1":
            return F.elu(x) + 1
        if self.kind == "silu":
            return F.silu(x)
        y = torch.einsum("bthd,hde->bthe", x, self.weight)
        if self.kind == "learnable":
            return y.softmax(-1)
        return torch.cat([y.softmax(-1), (-y).softmax(-1)], dim=-1)


class HeadNorm(nn.Module):
    """Normalize each head's vector [.., H, D]: RMSNorm, or group norm (mean-centred) per head."""

    def __init__(self, dim: int, eps: float, centred: bool = False):
        super().__init__()
        self.eps, self.centred = eps, centred
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        if self.centred:
            xf = xf - xf.mean(-1, keepdim=True)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


class LinearAttentionBase(nn.Module):
    """Shared projections, feature map, output norm and gate; subclasses define the decay."""

    kind = "linear"
    hf_attention = False  # no Hugging Face equivalent
    feature_map = "identity"
    output_norm = True
    output_gate = True
    rope = False
    centred_norm = False
    normalize = False

    def __init__(self, cfg, layer: int):
        super().__init__()
        self.h, self.d = cfg.n_heads, cfg.hd
        self.chunk_size = int(_option(cfg, "linear_chunk_size", 64))
        self.impl = _option(cfg, "linear_impl", "auto")
        self.use_rope = bool(_option(cfg, "linear_rope", self.rope))
        self.normalize = bool(_option(cfg, "linear_normalize", self.normalize))
        self.q_proj = nn.Linear(cfg.dim, self.h * self.d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.dim, self.h * self.d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.dim, self.h * self.d, bias=cfg.attention_bias)
        kind = _option(cfg, "linear_feature_map", self.feature_map)
        self.q_map = FeatureMap(kind, self.h, self.d)
        self.k_map = FeatureMap(kind, self.h, self.d)
        self.dk = self.q_map.out_dim
        self.scale = self.dk**-0.5
        self.o_norm = (
            HeadNorm(self.d, cfg.norm_eps, self.centred_norm)
            if _option(cfg, "linear_output_norm", self.output_norm)
            else None
        )
        self.g_proj = (
            nn.Linear(cfg.dim, self.h * self.d, bias=False)
            if _option(cfg, "linear_output_gate", self.output_gate)
            else None
        )
        self.o_proj = nn.Linear(self.h * self.d, cfg.dim, bias=False)

    @staticmethod
    def core_flops(cfg, layer: int, doc_lens) -> float:
        """State update k^T v and readout q S, fwd+bwd: 3 * 2 * 2 * H * Dk * Dv per token
        (Dk = D; the hedgehog map's 2 D is not distinguished here), whatever the documents."""
        return 12 * cfg.n_heads * cfg.hd * cfg.hd * sum(int(n) for n in doc_lens)

    def decay(self, x):
        """(g [B,T,H] or None, gk [B,T,H,Dk] or None) log-decays, <= 0."""
        return None, None

    def forward(self, x, cos, sin, ctx):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.d)
        k = self.k_proj(x).view(b, t, self.h, self.d)
        v = self.v_proj(x).view(b, t, self.h, self.d)
        if self.use_rope:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = self.q_map(q), self.k_map(k)
        g, gk = self.decay(x)
        kw = dict(g=g, gk=gk, scale=self.scale, chunk_size=self.chunk_size, impl=self.impl)
        if self.normalize:  # numerator and denominator in one call: v1 [B, T, H, D+1]
            v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
            o1 = ctx.run(self.kind, q, k, v1, **kw)
            o = o1[..., :-1] / (o1[..., -1:] + 1e-6 * self.scale)
        else:
            o = ctx.run(self.kind, q, k, v, **kw)
        if self.o_norm is not None:
            o = self.o_norm(o)
        if self.g_proj is not None:
            o = o * F.silu(self.g_proj(x)).view(b, t, self.h, self.d)
        return self.o_proj(o.reshape(b, t, self.h * self.d))


@register_mixer("linear")
class LinearAttention(LinearAttentionBase):
    """Basic linear attention, no decay: S_t = S_{t-1} + phi(k_t)^T v_t."""

    feature_map = "elu1"
    output_gate = False


class _ConstantDecay(LinearAttentionBase):
    """Data-independent log-decay per head (a non-persistent buffer [H])."""

    def __init__(self, cfg, layer: int):
        super().__init__(cfg, layer)
        self.register_buffer("log_decay", self.head_log_decay(self.h), persistent=False)

    @staticmethod
    def head_log_decay(n_heads: int) -> torch.Tensor:
        raise NotImplementedError

    def decay(self, x):
        return self.log_decay.to(acc_dtype(x)).expand(*x.shape[:2], self.h), None  # keep fp32 decays


@register_mixer("lightning")
class LightningAttention(_ConstantDecay):
    """Lightning attention (TransNormerLLM): log-decay -slope_h, slope_h = 2^(-8 (h+1) / H)."""

    feature_map = "silu"

    @staticmethod
    def head_log_decay(n_heads):
        return -torch.pow(2.0, -8.0 * torch.arange(1, n_heads + 1, dtype=torch.float64) / n_heads)


@register_mixer("retention")
class Retention(_ConstantDecay):
    """RetNet multi-scale retention: log-decay log(1 - 2^(-5-h)), RoPE, group norm per head."""

    rope = True
    centred_norm = True

    @staticmethod
    def head_log_decay(n_heads):
        return torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(n_heads, dtype=torch.float64)))


@register_mixer("simple_gla")
class SimpleGLA(LinearAttentionBase):
    """Data-dependent scalar decay per head: g = logsigmoid(W_g x) / normalizer."""

    def __init__(self, cfg, layer: int):
        super().__init__(cfg, layer)
        self.normalizer = float(_option(cfg, "linear_gate_normalizer", 16))
        self.decay_proj = nn.Linear(cfg.dim, self.h, bias=True)

    def decay(self, x):
        return F.logsigmoid(self.decay_proj(x)) / self.normalizer, None


@register_mixer("gla")
class GatedLinearAttention(LinearAttentionBase):
    """GLA: per-key decay gk = logsigmoid(W2 W1 x + b) / normalizer, W1 W2 of low rank."""

    def __init__(self, cfg, layer: int):
        super().__init__(cfg, layer)
        self.normalizer = float(_option(cfg, "linear_gate_normalizer", 16))
        rank = int(_option(cfg, "linear_gate_low_rank", 16))
        self.decay_down = nn.Linear(cfg.dim, rank, bias=False)
        self.decay_up = nn.Linear(rank, self.h * self.dk, bias=True)

    def decay(self, x):
        b, t, _ = x.shape
        gk = F.logsigmoid(self.decay_up(self.decay_down(x))) / self.normalizer
        return None, gk.view(b, t, self.h, self.dk)
