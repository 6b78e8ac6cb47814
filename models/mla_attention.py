"""Multi-head latent attention (kind ``mla``): DeepSeek-V2/V3 attention.

Keys and values come from one low-rank latent per token: the layer caches (and a CP strategy
moves) ``c_kv`` [B, T, 1, Dc] after its RMSNorm and one RoPE key ``k_rot`` [B, T, 1, Dr]
shared by every head, instead of per-head K and V.

    x [B, T, dim]
    q      = q_b(norm(q_a(x)))  or  q_proj(x)        [B, T, H, Dn + Dr]  (Dn: no RoPE, Dr: RoPE)
    c_kv, k_rot = kv_a(x)                            [B, T, Dc], [B, T, Dr]
    c_kv   = norm(c_kv)                              the latent (kv_a_layernorm)
    k_nope, v = kv_b(c_kv)                           [B, T, H, Dn], [B, T, H, Dv]
    k      = [k_nope, k_rot broadcast over heads]    [B, T, H, Dn + Dr]
    o      = softmax(q k^T * scale) v                [B, T, H, Dv] -> o_proj -> [B, T, dim]

RoPE touches only the last Dr dims of q and the shared k_rot. Its frequencies are the first
Dr / 2 of the model's rotary table (``model.head_dim`` wide): a DeepSeek import sets head_dim =
qk_rope_head_dim (as transformers' DeepseekV3Config does), so the table is DeepSeek's; an
upcycled Llama layer keeps its highest Dr / 2 frequencies (trainer/upcycle.py).
The softmax scale is (Dn + Dr)^-0.5, times DeepSeek's YaRN mscale(factor, mscale_all_dim)^2 when
RoPE is YaRN-scaled (``model.mla_mscale_all_dim``).

The kind's op ``ctx.run("mla", q, c_kv, k_rot, kv_b=W, v_head_dim=Dv, causal, window, scale)``
up-projects the latent and runs softmax attention under the document mask; a CP strategy may
instead move the latent and up-project on the receiving rank (parallel/strategies/mla_latent.py),
or up-project locally and hand K/V to any softmax strategy (``mla_kv`` there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import RMSNorm
from models.ops.documents import causal_pairs
from models.registry import options_of, register_kind, register_mixer, register_options
from models.rope import apply_rotary
from models.softmax_attention import local_softmax_attention, local_softmax_attention_ref


@register_options("mla")
@dataclass
class MLAOptions:
    """Settings ``model.mla_<field>``; None: derived from the model (see ``dims``)."""

    q_lora_rank: int | None = None  # None: a full-rank q_proj; else q_a_proj -> norm -> q_b_proj
    kv_lora_rank: int | None = None  # Dc; None: 4 * head_dim (DeepSeek: 512 = 4 * 128)
    qk_nope_head_dim: int | None = None  # Dn; None: head_dim
    qk_rope_head_dim: int | None = None  # Dr; None: head_dim (the whole rotary table)
    v_head_dim: int | None = None  # Dv; None: head_dim
    latent_norm: bool = True  # RMSNorm on c_kv (and on the q latent): DeepSeek always has it
    latent_norm_eps: float = 1e-6  # DeepSeek's kv_a_layernorm / q_a_layernorm eps (not rms_norm_eps)
    mscale_all_dim: float = 0.0  # DeepSeek YaRN: softmax scale *= mscale(factor, this)^2 (0: off)

    def dims(self, cfg) -> tuple[int, int, int, int]:
        """(Dc, Dn, Dr, Dv) with the defaults filled in."""
        hd = cfg.hd
        return (
            self.kv_lora_rank or 4 * hd,
            hd if self.qk_nope_head_dim is None else self.qk_nope_head_dim,
            self.qk_rope_head_dim or hd,
            self.v_head_dim or hd,
        )

    def validate(self, cfg) -> None:
        if not any(cfg.mixer_of(i) == "mla" for i in range(cfg.n_layers)):
            return
        dc, dn, dr, dv = self.dims(cfg)
        for name, val in (("kv_lora_rank", dc), ("v_head_dim", dv), ("qk_rope_head_dim", dr)):
            if val < 1:
                raise ValueError(f"model.mla_{name}={val} must be >= 1")
        if dn < 0:
            raise ValueError(f"model.mla_qk_nope_head_dim={dn} must be >= 0")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise ValueError(f"model.mla_q_lora_rank={self.q_lora_rank} must be >= 1 or null (full-rank q_proj)")
        if dr % 2 or dr > cfg.hd:
            raise ValueError(
                f"model.mla_qk_rope_head_dim={dr} must be even and at most the rotary table's width "
                f"model.head_dim={cfg.hd}: MLA layers take their RoPE frequencies from it"
            )


def mla_scale(cfg, opts: MLAOptions) -> float:
    """(Dn + Dr)^-0.5, with DeepSeek's YaRN mscale^2 when RoPE is YaRN-scaled."""
    _, dn, dr, _ = opts.dims(cfg)
    scale = (dn + dr) ** -0.5
    r = cfg.rope
    if r.type == "yarn" and opts.mscale_all_dim and r.factor > 1:
        m = 0.1 * opts.mscale_all_dim * math.log(r.factor) + 1.0
        scale *= m * m
    return scale


def rope_index(rope_dim: int, table_dim: int) -> torch.Tensor | None:
    """Columns of the rotary table's cos/sin [.., table_dim] (laid out cat(f, f)) that rotate a
    rope_dim-wide rotate-half vector with the table's first rope_dim / 2 frequencies; None when
    the whole table is used."""
    if rope_dim == table_dim:
        return None
    half = torch.arange(rope_dim // 2)
    return torch.cat([half, table_dim // 2 + half])


def up_project(c, k_rot, kv_b, n_heads: int, v_head_dim: int):
    """c [B, T, 1, Dc], k_rot [B, T, 1, Dr], kv_b [H * (Dn + Dv), Dc]
    -> k [B, T, H, Dn + Dr] (k_rot shared by every head), v [B, T, H, Dv]."""
    b, t = c.shape[:2]
    kv = F.linear(c[:, :, 0], kv_b).view(b, t, n_heads, -1)
    k_nope, v = kv.split([kv.shape[-1] - v_head_dim, v_head_dim], dim=-1)
    k = torch.cat([k_nope, k_rot.expand(b, t, n_heads, k_rot.shape[-1])], dim=-1)
    return k, v


def pad_heads(q, k, v):
    """The softmax kernels take one head dim for q, k and v: zero-pad to the larger (zeros in
    q / k add nothing to the scores, zeros in v give output columns that are sliced off)."""
    d = max(q.shape[-1], v.shape[-1])
    return tuple(x if x.shape[-1] == d else F.pad(x, (0, d - x.shape[-1])) for x in (q, k, v))


def attend(op, q, k, v, ctx, **options):
    """op(q, k, v, ctx, **options) (a softmax op or strategy) with Dv != Dn + Dr allowed; the
    scale must be explicit (padding changes the default)."""
    dv = v.shape[-1]
    qp, kp, vp = pad_heads(q, k, v)
    return op(qp, kp, vp, ctx, **options)[..., :dv]


def rotate_query(q, cos, sin, dn: int):
    """q [B, T, H, Dn + Dr] with RoPE on its last Dr dims only (cos, sin [B, T, 1, Dr])."""
    q_nope, q_rot = q.split([dn, q.shape[-1] - dn], dim=-1)
    return torch.cat([q_nope, apply_rotary(q_rot, cos, sin)], dim=-1)


def local_mla_ref(q, c, k_rot, ctx, *, kv_b, v_head_dim, causal=True, window=None, scale=None):
    """Naive reference of the mla kind: up-project, then the dense softmax reference."""
    k, v = up_project(c, k_rot, kv_b, q.shape[2], v_head_dim)
    return attend(local_softmax_attention_ref, q, k, v, ctx, causal=causal, window=window, scale=scale)


@register_kind("mla", reference=local_mla_ref)
def local_mla(q, c, k_rot, ctx, *, kv_b, v_head_dim, causal=True, window=None, scale=None):
    """q [B, T, H, Dn + Dr], c [B, T, 1, Dc], k_rot [B, T, 1, Dr], kv_b [H * (Dn + Dv), Dc]
    -> o [B, T, H, Dv]: the up-projected K/V through the block-sparse softmax kernel."""
    k, v = up_project(c, k_rot, kv_b, q.shape[2], v_head_dim)
    return attend(local_softmax_attention, q, k, v, ctx, causal=causal, window=window, scale=scale)


@register_mixer("mla")
class MultiHeadLatentAttention(nn.Module):
    kind = "mla"
    hf_attention = False  # DeepSeek weights (models/hf_mla.py), not Llama's q/k/v/o

    @staticmethod
    def core_flops(cfg, layer: int, doc_lens) -> float:
        """FLOPs (fwd+bwd) of the core attention: 6 * H * (Dn + Dr + Dv) per allowed (query, key)
        pair (scores 2 * H * (Dn + Dr), values 2 * H * Dv forward, twice that backward)."""
        _, dn, dr, dv = options_of(cfg, "mla").dims(cfg)
        return 6 * cfg.n_heads * (dn + dr + dv) * causal_pairs(doc_lens, cfg.sliding_window)

    def __init__(self, cfg, layer: int):
        super().__init__()
        opts = options_of(cfg, "mla")
        self.dc, self.dn, self.dr, self.dv = opts.dims(cfg)
        self.n_heads, self.window = cfg.n_heads, cfg.sliding_window
        self.scale = mla_scale(cfg, opts)
        h, dqk, bias, eps = cfg.n_heads, self.dn + self.dr, cfg.attention_bias, opts.latent_norm_eps
        if opts.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.dim, h * dqk, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.dim, opts.q_lora_rank, bias=bias)
            self.q_a_norm = RMSNorm(opts.q_lora_rank, eps) if opts.latent_norm else nn.Identity()
            self.q_b_proj = nn.Linear(opts.q_lora_rank, h * dqk, bias=False)
        self.kv_a_proj = nn.Linear(cfg.dim, self.dc + self.dr, bias=bias)
        self.kv_a_norm = RMSNorm(self.dc, eps) if opts.latent_norm else nn.Identity()
        self.kv_b_proj = nn.Linear(self.dc, h * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(h * self.dv, cfg.dim, bias=bias)
        idx = rope_index(self.dr, cfg.hd)
        self.register_buffer("rope_idx", idx, persistent=False)

    def query(self, x):
        """x [B, T, dim] -> q [B, T, H, Dn + Dr] before RoPE."""
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        return q.view(*x.shape[:2], self.n_heads, self.dn + self.dr)

    def latent(self, x, cos, sin):
        """x [B, T, dim] -> (c_kv [B, T, 1, Dc] after its norm, k_rot [B, T, 1, Dr] after RoPE):
        what the KV cache holds and what mla_latent moves."""
        c, k_rot = self.kv_a_proj(x).split([self.dc, self.dr], dim=-1)
        return self.kv_a_norm(c)[:, :, None], apply_rotary(k_rot[:, :, None], cos, sin)

    def forward(self, x, cos, sin, ctx):
        b, t, _ = x.shape
        if self.rope_idx is not None:  # the first Dr / 2 frequencies of the model's table
            cos, sin = cos[..., self.rope_idx], sin[..., self.rope_idx]
        q = rotate_query(self.query(x), cos, sin, self.dn)
        c, k_rot = self.latent(x, cos, sin)
        o = ctx.run(
            self.kind,
            q,
            c,
            k_rot,
            kv_b=self.kv_b_proj.weight,
            v_head_dim=self.dv,
            causal=True,
            window=self.window,
            scale=self.scale,
        )
        return self.o_proj(o.reshape(b, t, self.n_heads * self.dv))
