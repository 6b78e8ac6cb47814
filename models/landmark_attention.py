"""Landmark attention (mixer ``landmark``, kind ``landmark``): the grouped softmax of
Mohtashami & Jaggi, "Landmark Attention" (epfml/landmark-attention, llama/llama_mem.py,
``landmark_grouped_softmax`` and the masks built in ``LlamaModel.forward``), training form.

Every document is cut into blocks of l = every + 1 tokens; the last token of each block is its
landmark (in-document position p with p % l == every; the data puts the landmark token there).
For a query i in block b_i, with scores s_ij = q_i . k_j * scale:

    main group   the regular tokens of b_i up to i, and the landmarks of blocks b < b_i
                 (b_i's own landmark is masked, as there) -> p = softmax over the group
    block b<b_i  its regular tokens j: weight p(landmark of b) * softmax_{j' in b}(s_ij')_j
    o_i = sum_j weight_ij v_j   (a landmark passes its weight on; its own value is unused)

So a token's attention to an earlier block is gated by the softmax over the landmark tokens:
the model learns to retrieve blocks. Shapes: q [B, Tq, H, D], k, v [B, Tk, Hkv, D] (GQA); the
op is dense in (Tq, Tk) (the paper's training form): CP strategies gather every rank's K/V
(parallel/strategies/gather_keys.py) and run ``landmark_core`` on the local queries.

Setting: ``LandmarkOptions`` (model.landmark_every: regular tokens per block, 50 in the paper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from models.ops.attention import check_inputs
from models.registry import options_of, register_kind, register_mixer, register_options
from models.rope import apply_rotary


def doc_positions(index, doc, k_index, k_doc):
    """In-document positions [B, T] of the tokens at row positions ``index`` [T] (documents ``doc``
    [B, T]), the documents' starts read from keys ``k_index`` [S] / ``k_doc`` [B, S] that hold
    every position of the row up to the last of ``index``."""
    big = torch.iinfo(torch.int64).max
    ids, inv = torch.unique(torch.cat([k_doc, doc], dim=1), return_inverse=True)
    kinv, qinv = inv[:, : k_doc.shape[1]], inv[:, k_doc.shape[1] :]
    start = torch.full((doc.shape[0], len(ids)), big, dtype=torch.int64)
    start.scatter_reduce_(1, kinv, k_index.expand_as(k_doc).contiguous(), "amin")
    return index[None, :] - start.gather(1, qinv)


def gate_group(cur, mem, old):
    """The keys the landmark gate is normalised over: the current block and earlier landmarks."""
    return cur | mem


def landmark_core(q, k, v, q_index, q_doc, k_index, k_doc, *, every: int, scale=None):
    """o [B, Tq, H, D] of the grouped softmax (module docstring). ``k_index`` [Tk] must hold every
    row position up to the last query's (all ranks' keys under CP), in any order."""
    b, tq, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    size = every + 1
    qp, kp = doc_positions(q_index, q_doc, k_index, k_doc), doc_positions(k_index, k_doc, k_index, k_doc)
    qb, kb, k_mem = qp // size, kp // size, kp % size == every  # [B, Tq], [B, Tk], [B, Tk]
    vis = (q_doc[:, :, None] == k_doc[:, None, :]) & (k_index[None, None, :] <= q_index[None, :, None])
    same_block = kb[:, None, :] == qb[:, :, None]
    earlier = kb[:, None, :] < qb[:, :, None]
    cur = vis & same_block & ~k_mem[:, None, :]  # [B, Tq, Tk]
    mem = vis & earlier & k_mem[:, None, :]
    old = vis & earlier & ~k_mem[:, None, :]
    g = h // k.shape[2]
    kr, vr = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, kr) * scale  # [B, H, Tq, Tk]
    main = s.masked_fill(~gate_group(cur, mem, old)[:, None], -math.inf).softmax(-1).nan_to_num(0.0)
    # within-block softmax over the regular tokens of each earlier block (groups: key blocks)
    nblk = int(kb.max()) + 1
    grp = kb[:, None, None, :].expand_as(s)  # [B, H, Tq, Tk]
    so = s.masked_fill(~old[:, None], -math.inf)
    top = torch.full((*s.shape[:3], nblk), -math.inf, dtype=s.dtype).scatter_reduce(
        3, grp, so.detach(), "amax"
    )  # per-group max, a stabiliser only
    e = (so - top.gather(3, grp).nan_to_num(0.0, neginf=0.0)).exp()
    z = torch.zeros_like(top).scatter_add(3, grp, e)
    inner = e / z.gather(3, grp).clamp_min(torch.finfo(s.dtype).tiny)
    # the gate of each key: the main-group probability of its block's landmark
    n = int(k_index.max()) + 1
    where = torch.zeros(n, dtype=torch.int64)
    where[k_index] = torch.arange(len(k_index))
    landmark_at = (k_index[None, :] - kp + kb * size + every).clamp(0, n - 1)  # [B, Tk] row position
    gate = main.gather(3, where[landmark_at][:, None, None, :].expand_as(s))  # used where ``old`` only
    w = main * cur[:, None] + inner * gate * old[:, None]
    return torch.einsum("bhij,bjhd->bihd", w, vr).to(q.dtype)


def _local_landmark(q, k, v, ctx, *, every: int, scale=None):
    """The single-device op (and its reference: the op is already the dense formulation)."""
    check_inputs(q, k, None)
    d = ctx.docs
    return landmark_core(q, k, v, d.index, d.doc, d.index, d.doc, every=every, scale=scale)


register_kind("landmark", reference=_local_landmark)(_local_landmark)


@register_options("landmark")
@dataclass
class LandmarkOptions:
    every: int = 50  # regular tokens per block; the block's landmark follows them

    def validate(self, cfg) -> None:
        if self.every < 1:
            raise ValueError(f"model.landmark_every={self.every} must be >= 1")


@register_mixer("landmark")
class LandmarkAttention(nn.Module):
    """The softmax layer's projections and RoPE, landmark grouped softmax as its core."""

    kind = "landmark"
    hf_attention = True  # the softmax layer's parameters: transformers holds them
    hf_options = ("landmark",)  # config.json keeps model.landmark_* (models/hybrid_attention.py)

    @staticmethod
    def core_flops(cfg, layer: int, doc_lens) -> float:
        """Every causal pair (the training form is dense), 12 * H * D each (fwd+bwd)."""
        from models.ops.documents import causal_pairs

        return 12 * cfg.n_heads * cfg.hd * causal_pairs(doc_lens)

    def __init__(self, cfg, layer: int):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.hd
        self.every = int(options_of(cfg, "landmark").every)
        self.q_proj = nn.Linear(cfg.dim, self.n_heads * self.hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.dim, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.dim, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.dim, bias=False)

    def forward(self, x, cos, sin, ctx):
        b, t, _ = x.shape
        q = apply_rotary(self.q_proj(x).view(b, t, self.n_heads, self.hd), cos, sin)
        k = apply_rotary(self.k_proj(x).view(b, t, self.n_kv, self.hd), cos, sin)
        v = self.v_proj(x).view(b, t, self.n_kv, self.hd)
        o = ctx.run(self.kind, q, k, v, every=self.every)
        return self.o_proj(o.reshape(b, t, self.n_heads * self.hd))
