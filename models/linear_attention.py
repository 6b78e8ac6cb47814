"""Linear-attention token mixers: linear, lightning, retention, simple_gla, gla.

x [B, T, dim] -> q, k [B, T, H, Dk], v [B, T, H, D], log-decay g [B, T, H] or gk [B, T, H, Dk]
-> ctx.run("linear") -> o [B, T, H, D] -> per-head norm, gate
-> [B, T, dim].  H = n_heads for q, k and v alike (no GQA for linear mixers; n_kv_heads is
ignored), D = cfg.hd, Dk = D (2 D for the hedgehog feature map).

Settings: ``LinearOptions`` below, registered as the keys model.linear_<field> (None there: the
default here, or for the four marked "mixer" the mixer class's own choice):
    feature_map      identity | relu | elu1 | silu | learnable | hedgehog (mixer)
    output_norm      bool, RMSNorm per head (retention: group norm per head) (mixer)
    output_gate      bool, o * silu(W_gate x) (mixer)
    rope             bool, rotate q, k with the model's RoPE (before the feature map) (mixer)
    normalize        bool, o_t = phi(q_t) S_t / (phi(q_t) z_t), z_t = sum of phi(k) (decayed
                     alike): v gets a ones column [B, T, H, D+1], so every CP strategy serves it
    chunk_size       int (64)
    impl             auto | chunk | naive (naive = token-by-token reference, for tests)
    gate_normalizer  float (16), simple_gla / gla: g = logsigmoid(W x) / normalizer
    gate_low_rank    int (16), gla: rank of the decay projection
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.ops.common import acc_dtype
from models.ops.linear_attention import IMPLS, linear_attention
from models.registry import options_of, register_kind, register_mixer, register_options
from models.rope import apply_rotary


def local_linear_attention_ref(q, k, v, ctx, *, g=None, gk=None, scale=1.0, chunk_size=64, impl="auto"):
    """The naive reference of the linear kind: the token-by-token recurrence (whatever ``impl``)."""
    return linear_attention(q, k, v, g, gk, scale, cu_seqlens=ctx.docs.cu_seqlens, impl="naive")


@register_kind("linear", reference=local_linear_attention_ref)
def local_linear_attention(q, k, v, ctx, *, g=None, gk=None, scale=1.0, chunk_size=64, impl="auto"):
    """Linear attention over the tokens ``ctx`` holds, the state restarting at every document.
    q, k [B,T,H,Dk], v [B,T,H,Dv], g [B,T,H], gk [B,T,H,Dk] -> o [B,T,H,Dv]."""
    return linear_attention(q, k, v, g, gk, scale, cu_seqlens=ctx.docs.cu_seqlens, chunk_size=chunk_size, impl=impl)


FEATURE_MAPS = ("identity", "relu", "elu1", "silu", "learnable", "hedgehog")


@register_options("linear")
@dataclass
class LinearOptions:
    """The settings model.linear_<field> of every linear mixer (module docstring); None: the
    mixer class's own choice (its class attribute of the same name)."""

    feature_map: str | None = None
    output_norm: bool | None = None
    output_gate: bool | None = None
    rope: bool | None = None
    normalize: bool | None = None
    chunk_size: int = 64
    impl: str = "auto"
    gate_normalizer: float = 16.0
    gate_low_rank: int = 16

    def validate(self, cfg) -> None:
        if self.impl not in IMPLS:
            raise ValueError(f"model.linear_impl={self.impl!r} is unknown: choose auto, chunk or naive")
        if self.feature_map is not None and self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"model.linear_feature_map={self.feature_map!r} is unknown: choose one of {FEATURE_MAPS}")
        if self.chunk_size < 1:
            raise ValueError(f"model.linear_chunk_size={self.chunk_size} must be >= 1")
        if self.gate_low_rank < 1:
            raise ValueError(f"model.linear_gate_low_rank={self.gate_low_rank} must be >= 1")
        if not self.gate_normalizer > 0:
            raise ValueError(f"model.linear_gate_normalizer={self.gate_normalizer} must be > 0")

    def choice(self, name: str, mixer) -> object:
        """Option ``name``, or the mixer class's own choice when the config leaves it None."""
        value = getattr(self, name)
        return getattr(mixer, name) if value is None else value


class FeatureMap(nn.Module):
    """phi applied to q or k per head: [B, T, H, D] -> [B, T, H, Dk]."""

    def __init__(self, name: str, n_heads: int, head_dim: int):
        super().__init__()
        if name not in FEATURE_MAPS:
            raise ValueError(f"model.linear_feature_map={name!r} is unknown: choose one of {FEATURE_MAPS}")
        self.name = name
        self.out_dim = 2 * head_dim if name == "hedgehog" else head_dim
        if name in ("learnable", "hedgehog"):  # per-head linear map (LoLCATs / Hedgehog)
            self.weight = nn.Parameter(torch.eye(head_dim).repeat(n_heads, 1, 1))

    def forward(self, x):
        if self.name == "identity":
            return x
        if self.name == "relu":
            return F.relu(x)
        if self.name == "elu1":
            return F.elu(x) + 1
        if self.name == "silu":
            return F.silu(x)
        y = torch.einsum("bthd,hde->bthe", x, self.weight)
        if self.name == "learnable":
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
        opts = self.options = options_of(cfg, "linear")
        self.chunk_size = int(opts.chunk_size)
        self.impl = opts.impl
        self.use_rope = bool(opts.choice("rope", self))
        self.normalize = bool(opts.choice("normalize", self))
        self.q_proj = nn.Linear(cfg.dim, self.h * self.d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.dim, self.h * self.d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.dim, self.h * self.d, bias=cfg.attention_bias)
        feature_map = opts.choice("feature_map", self)
        self.q_map = FeatureMap(feature_map, self.h, self.d)
        self.k_map = FeatureMap(feature_map, self.h, self.d)
        self.dk = self.q_map.out_dim
        self.scale = self.dk**-0.5
        self.o_norm = HeadNorm(self.d, cfg.norm_eps, self.centred_norm) if opts.choice("output_norm", self) else None
        self.g_proj = nn.Linear(cfg.dim, self.h * self.d, bias=False) if opts.choice("output_gate", self) else None
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
        self.normalizer = float(self.options.gate_normalizer)
        self.decay_proj = nn.Linear(cfg.dim, self.h, bias=True)

    def decay(self, x):
        return F.logsigmoid(self.decay_proj(x)) / self.normalizer, None


@register_mixer("gla")
class GatedLinearAttention(LinearAttentionBase):
    """GLA: per-key decay gk = logsigmoid(W2 W1 x + b) / normalizer, W1 W2 of low rank."""

    def __init__(self, cfg, layer: int):
        super().__init__(cfg, layer)
        self.normalizer = float(self.options.gate_normalizer)
        rank = int(self.options.gate_low_rank)
        self.decay_down = nn.Linear(cfg.dim, rank, bias=False)
        self.decay_up = nn.Linear(rank, self.h * self.dk, bias=True)

    def decay(self, x):
        b, t, _ = x.shape
        gk = F.logsigmoid(self.decay_up(self.decay_down(x))) / self.normalizer
        return None, gk.view(b, t, self.h, self.dk)
