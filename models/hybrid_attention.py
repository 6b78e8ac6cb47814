"""Linearized layers that call two kinds: a sliding-window softmax branch and a linear branch in
one layer (mixers ``liger`` and ``lolcats``), plus the ``delay`` kind LoLCATs needs.

Both keep the softmax layer's q/k/v/o projections (GQA included, so a Llama / Qwen2 checkpoint
loads as is) and reach their branches only through the context: the window branch is
``ctx.run("softmax", ..., window=W)`` (any softmax strategy serves it under CP; its window makes
allgather and ring move little) and the linear branch ``ctx.run("linear", ...)`` (LASP-2), one
CP group and one layout for both (``kinds = ("linear", "softmax")``).

Shapes: x [B, T, dim]; q [B, T, H, D]; k, v [B, T, Hkv, D] (repeated to H heads for the linear
branch, kv head j serving query heads j*G .. j*G+G-1 as GQA does); window W keys, self included
(key j is in query i's window when 0 <= i - j < W, same document).

    liger    (OpenSparseLLMs/Linearization, liger/models/liger_gla/modeling_liger_gla.py)
             linear: q, k without RoPE through softmax over the head dim, gate
             gk = logsigmoid(pool(k)) / 16 from the key projection itself (pooling the key
             width to itself is the identity, as there), scale 1: GLA. window: RoPE'd q, k,
             causal softmax over W = 64 keys. o = 0.5 o_window + 0.5 o_linear. No new
             parameters: the parameter set is the softmax layer's.
    lolcats  (HazyResearch/lolcats, src/model/linear_attention/linear_window_attention_sw.py)
             hedgehog feature maps (per-head linear map, softmax over [y, -y]) of the RoPE'd
             q, k; one shared normaliser over both branches:
                 y_i = (g * sum_{j in W(i)} p_ij v_j + sum_{j <= i-W} f(q_i).f(k_j) v_j)
                       / (g + sum_{j <= i-W} f(q_i).f(k_j))
             g = sigmoid(window_factor) per head (init logit(0.1), the authors' config),
             linear factor 1 (their ``affine_attention_factors: false``). Deliberate
             deviation: p_ij is the softmax *within the window* (the stabiliser c_i of
             exp(q.k / sqrt(D) - c_i) is the window's log-sum-exp; the authors subtract the
             window's max, which no softmax strategy returns). The linear sum runs over keys
             delayed by W (``ctx.run("delay")``, below), the denominator as a ones column of v.

Settings: ``HybridOptions`` (model.hybrid_<field>); the linear branch's chunk size, impl and
gate normaliser are model.linear_chunk_size / linear_impl / linear_gate_normalizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.linear_attention import FeatureMap
from models.ops.documents import causal_pairs
from models.registry import options_of, register_kind, register_mixer, register_options
from models.rope import apply_rotary


def delayed(x, src_index, src_doc, index, doc, delay: int, seq_len: int) -> torch.Tensor:
    """x [B, S, H, F] at row positions ``src_index`` [S] (document ids ``src_doc`` [B, S]) ->
    [B, C, H, F]: at each position ``index`` [C] (documents ``doc`` [B, C]) the token ``delay``
    positions earlier in the same document, zeros where there is none."""
    where = torch.full((seq_len,), -1, dtype=torch.int64)
    where[src_index] = torch.arange(len(src_index))
    p = index - delay
    j = torch.where(p >= 0, where[p.clamp(min=0)], -1)  # [C] source slot or -1
    ok = (j >= 0)[None, :] & (src_doc[:, j.clamp(min=0)] == doc)  # [B, C]
    return x[:, j.clamp(min=0)] * ok[:, :, None, None].to(x.device, x.dtype)


def local_delay_ref(q, k, v, ctx, *, delay: int):
    """The naive reference of the delay kind: a Python loop over the tokens."""
    out = torch.zeros_like(v)
    d = ctx.docs
    for b in range(v.shape[0]):
        for t in range(v.shape[1]):
            if t - delay >= 0 and d.doc[b, t - delay] == d.doc[b, t]:
                out[b, t] = v[b, t - delay]
    return out


@register_kind("delay", reference=local_delay_ref)
def local_delay(q, k, v, ctx, *, delay: int):
    """v [B, T, H, F] delayed by ``delay`` positions within each document (zeros before
    position ``delay`` of a document); q and k are not read (the context protocol's shape)."""
    d = ctx.docs
    return delayed(v, d.index, d.doc, d.index, d.doc, delay, int(d.index.max()) + 1 if len(d.index) else 0)


@register_options("hybrid")
@dataclass
class HybridOptions:
    """The settings model.hybrid_<field> of the two-kind mixers (module docstring)."""

    window: int = 64  # keys of the softmax branch, self included
    window_factor_init: float = -2.1972245773362196  # lolcats: logit of the window weight (0.1)
    meta_tokens: int = 4  # lizard: learned meta-memory tokens every query sees

    def validate(self, cfg) -> None:
        if self.window < 1:
            raise ValueError(f"model.hybrid_window={self.window} must be >= 1")
        if self.meta_tokens < 1:
            raise ValueError(f"model.hybrid_meta_tokens={self.meta_tokens} must be >= 1")


class _TwoKind(nn.Module):
    """The softmax layer's projections (same names and shapes) and the two branch calls."""

    kinds = ("linear", "softmax")
    hf_attention = False  # transformers holds no window + linear layer

    def __init__(self, cfg, layer: int):
        super().__init__()
        self.h, self.n_kv, self.d = cfg.n_heads, cfg.n_kv_heads, cfg.hd
        hyb, lin = options_of(cfg, "hybrid"), options_of(cfg, "linear")
        self.window = int(hyb.window)
        self.chunk_size, self.impl, self.normalizer = int(lin.chunk_size), lin.impl, float(lin.gate_normalizer)
        self.q_proj = nn.Linear(cfg.dim, self.h * self.d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.dim, self.n_kv * self.d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.dim, self.n_kv * self.d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.h * self.d, cfg.dim, bias=False)

    @staticmethod
    def state_dims(cfg) -> tuple[int, int]:
        """(Dk, Dv) of the linear branch's state per head."""
        return cfg.hd, cfg.hd

    @classmethod
    def cache_bytes(cls, cfg, layer: int, elem_bytes: int) -> tuple[int, int]:
        """(per token, fixed state) bytes at inference: nothing grows with the context; the state is
        the window's keys and values (W tokens) plus the linear branch's [H, Dk, Dv]."""
        window = options_of(cfg, "hybrid").window
        dk, dv = cls.state_dims(cfg)
        return 0, (2 * window * cfg.n_kv_heads * cfg.hd + cfg.n_heads * dk * dv) * elem_bytes

    @classmethod
    def calls(cls, cfg) -> list[dict]:
        """The context calls of one forward, for the cost model (parallel/cost_model.py sums
        their bytes): per call its kind, heads of q and of k / v, widths (``key_dim`` of q and
        k where it differs from ``head_dim``, the width of v) and reach (``window`` keys)."""
        h, hkv, d, w = cfg.n_heads, cfg.n_kv_heads, cfg.hd, options_of(cfg, "hybrid").window
        return [
            dict(kind="linear", n_heads=h, n_kv_heads=h, head_dim=d),
            dict(kind="softmax", n_heads=h, n_kv_heads=hkv, head_dim=d, window=w),
        ]

    @staticmethod
    def core_flops(cfg, layer: int, doc_lens) -> float:
        """The linear branch's state terms plus the window branch's allowed pairs (fwd+bwd)."""
        window = options_of(cfg, "hybrid").window
        linear = 12 * cfg.n_heads * cfg.hd * cfg.hd * sum(int(n) for n in doc_lens)
        return linear + 12 * cfg.n_heads * cfg.hd * causal_pairs(doc_lens, window)

    def qkv(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.d)
        k = self.k_proj(x).view(b, t, self.n_kv, self.d)
        v = self.v_proj(x).view(b, t, self.n_kv, self.d)
        return q, k, v

    def repeat_kv(self, x):
        """[B, T, Hkv, F] -> [B, T, H, F] (GQA's head order)."""
        return x.repeat_interleave(self.h // self.n_kv, dim=2)

    def window_branch(self, qr, kr, v, ctx):
        """Causal softmax over the last W keys of the RoPE'd q, k -> [B, T, H, D]."""
        return ctx.run("softmax", qr, kr, v, causal=True, window=self.window)

    def out(self, o):
        b, t = o.shape[:2]
        return self.o_proj(o.reshape(b, t, self.h * self.d))


@register_mixer("liger")
class LigerAttention(_TwoKind):
    """Liger attention: 0.5 sliding-window softmax + 0.5 GLA gated by the key projection."""

    hf_attention = True  # the softmax layer's parameters exactly: transformers holds them
    hf_options = ("hybrid",)  # config.json keeps these settings (hybrid_to_hf)

    def forward(self, x, cos, sin, ctx):
        q, k, v = self.qkv(x)
        gk = self.repeat_kv(F.logsigmoid(k) / self.normalizer)  # [B, T, H, D] per-key log-decay
        ql, kl = q.softmax(-1), self.repeat_kv(k.softmax(-1))
        kw = dict(gk=gk, scale=1.0, chunk_size=self.chunk_size, impl=self.impl)
        o_lin = ctx.run("linear", ql, kl, self.repeat_kv(v), **kw)
        o_win = self.window_branch(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, ctx)
        return self.out(0.5 * o_win + 0.5 * o_lin)


@register_mixer("lolcats")
class LolcatsAttention(_TwoKind):
    """LoLCATs: window softmax + hedgehog linear attention outside the window, one normaliser."""

    kinds = ("linear", "softmax", "delay")

    @staticmethod
    def state_dims(cfg) -> tuple[int, int]:
        """Hedgehog features (2 D) by the values and their normaliser (D + 1)."""
        return 2 * cfg.hd, cfg.hd + 1

    @classmethod
    def calls(cls, cfg) -> list[dict]:
        """The window branch; the delay of [hedgehog keys (2 D), values, ones] by W positions;
        the linear branch over 2 D features with D + 1 values (numerator and normaliser)."""
        h, hkv, d, w = cfg.n_heads, cfg.n_kv_heads, cfg.hd, options_of(cfg, "hybrid").window
        return [
            dict(kind="softmax", n_heads=h, n_kv_heads=hkv, head_dim=d, window=w),
            dict(kind="delay", n_heads=h, n_kv_heads=h, head_dim=3 * d + 1, delay=w),
            dict(kind="linear", n_heads=h, n_kv_heads=h, head_dim=d + 1, key_dim=2 * d),
        ]

    def __init__(self, cfg, layer: int):
        super().__init__(cfg, layer)
        self.q_map = FeatureMap("hedgehog", self.h, self.d)
        self.k_map = FeatureMap("hedgehog", self.h, self.d)
        init = float(options_of(cfg, "hybrid").window_factor_init)
        self.window_factors = nn.Parameter(torch.full((self.h,), init))

    def forward(self, x, cos, sin, ctx):
        q, k, v = self.qkv(x)
        qr, kr = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o_win = self.window_branch(qr, kr, v, ctx)
        fq, fk = self.q_map(qr), self.k_map(self.repeat_kv(kr))  # [B, T, H, 2D]
        vr = self.repeat_kv(v)
        kv1 = torch.cat([fk, vr, torch.ones_like(vr[..., :1])], dim=-1)  # [B, T, H, 2D + D + 1]
        kv1 = ctx.run("delay", kv1, kv1, kv1, delay=self.window)  # keys outside the window only
        fk, v1 = kv1.split([fk.shape[-1], self.d + 1], dim=-1)
        o1 = ctx.run("linear", fq, fk, v1, scale=1.0, chunk_size=self.chunk_size, impl=self.impl)
        g = torch.sigmoid(self.window_factors)[:, None]  # [H, 1]
        return self.out((g * o_win + o1[..., : self.d]) / (g + o1[..., self.d :]))


HF_KEY = "longctx_mixers"  # config.json entry: the mixer pattern and the settings of its mixers


def hybrid_to_hf(cfg) -> dict:
    """{HF_KEY: the mixer pattern and every <prefix>_<field> setting of the option groups its
    mixers name in ``hf_options``} when a mixer of the pattern names any (liger, landmark), else
    {}. transformers ignores the key and loads the projections as its dense attention; longctx
    reloads the pattern."""
    import dataclasses

    from models.registry import OPTIONS, mixer_class

    prefixes = dict.fromkeys(p for m in cfg.mixer_pattern for p in getattr(mixer_class(m), "hf_options", ()))
    if not prefixes:
        return {}
    out = {"mixer_pattern": list(cfg.mixer_pattern)}
    for prefix in prefixes:
        opts = options_of(cfg, prefix)
        out.update({f"{prefix}_{f.name}": getattr(opts, f.name) for f in dataclasses.fields(OPTIONS[prefix])})
    return {HF_KEY: out}


def hybrid_from_hf(hf: dict) -> dict:
    """ModelConfig fields from ``hf[HF_KEY]`` ({} without it); ValueError for an unknown key."""
    import dataclasses

    from models.config import ModelConfig

    got = hf.get(HF_KEY)
    if not got:
        return {}
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(got) - fields)
    if unknown:
        raise ValueError(f"config.json {HF_KEY} has unknown keys {unknown}: expected ModelConfig fields")
    return {k: list(v) if k == "mixer_pattern" else v for k, v in got.items()}
