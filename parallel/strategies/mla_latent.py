"""Context parallelism for multi-head latent attention (kind ``mla``, models/mla_attention.py).

Shapes (local shards, one layout everywhere):
    q        [B, C, H, Dn + Dr]    this rank's queries (RoPE on the last Dr dims)
    c        [B, C, 1, Dc]         the latent c_kv after its norm
    k_rot    [B, C, 1, Dr]         the RoPE key, shared by every head
    kv_b     [H * (Dn + Dv), Dc]   the up-projection (a parameter: its gradient is this rank's share)
    lat      [B, C, 1, Dc + Dr]    c and k_rot side by side: what ``mla_latent`` moves
    k, v     [B, S*C, H, Dn + Dr], [B, S*C, H, Dv]   up-projected on the receiving rank
    o        [B, C, H, Dv]

``mla_latent`` (the kind's default): all-gather the latent and the shared RoPE key instead of
K and V -- (Dc + Dr) numbers per token instead of 2 * Hkv * D -- and up-project on every rank
(the same exchange as ``allgather``: ``gather=needed`` receives only the chunks this rank's
queries can see, ``gather=all`` one collective). The layer is one autograd Function that keeps
for backward only the local q, c, k_rot, o and lse: its backward gathers the latent again
(cheap: it is small), recomputes K/V, runs ``attention_backward``, folds dK / dV back into the
latent (dc = [dK_nope, dV] W, dk_rot = dK_rot summed over the heads that share it) and returns
each chunk's gradient to its owner. Receives (P-1) * B * C * (Dc + Dr) * e bytes per rank and
layer forward (gather=all; at most that with needed), twice that backward.

Attending in the latent space with the up-projections absorbed into q and o (DeepSeek's
inference trick) would save the up-projection of the S*C gathered tokens but turns every
head's score dot product into a Dc + Dr wide one (4x Dn + Dr for DeepSeek-V3): for training,
where every query meets every key, that costs more than the up-projection; it is not built.

``mla_kv``: up-project locally and hand the per-head K/V to any softmax strategy
(``parallel.cp.options.mla.softmax``: allgather, ring, ulysses, ...): the plain softmax
strategies serve MLA layers, moving 2 * H * max(Dn + Dr, Dv) numbers per token (V zero-padded
to the q/k width, which the softmax kernels need).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from models.mla_attention import attend, pad_heads, up_project
from models.ops.attention import MaskSpec, attention_backward, attention_forward
from parallel.strategies.allgather import Exchange, need_matrix
from parallel.strategies.base import STRATEGIES, LayerShape, Strategy, build_strategy, register


def _expand(lat, kv_b, n_heads: int, dc: int, dv: int):
    """lat [B, N, 1, Dc + Dr] -> k, v up-projected, zero-padded to one head dim."""
    k, v = up_project(lat[..., :dc], lat[..., dc:], kv_b, n_heads, dv)
    return k, v


def shared_key_grad(dk_rot: torch.Tensor) -> torch.Tensor:
    """dK_rot [B, N, H, Dr] -> [B, N, 1, Dr]: one RoPE key serves every head, so its gradient is
    the sum of the heads' (taking one head's is the classic bug; the tests plant it)."""
    return dk_rot.sum(dim=2, keepdim=True)


class LatentAttention(torch.autograd.Function):
    """Gather the latent, up-project, attend; keep only local tensors for backward."""

    @staticmethod
    def forward(fctx, q, c, k_rot, kv_b, dv: int, ex: Exchange, mask: MaskSpec, scale, block):
        dc, h = c.shape[-1], q.shape[2]
        lat = ex.gather(torch.cat([c, k_rot], dim=-1)[None])[0]  # [B, S*C, 1, Dc + Dr]
        k, v = _expand(lat, kv_b, h, dc, dv)
        qp, kp, vp = pad_heads(q, k, v)
        o, lse = attention_forward(qp, kp, vp, mask, scale, block)
        fctx.save_for_backward(q, c, k_rot, kv_b, o, lse)
        fctx.dv, fctx.ex, fctx.mask, fctx.scale, fctx.block = dv, ex, mask, scale, block
        return o[..., :dv]

    @staticmethod
    def backward(fctx, do):
        q, c, k_rot, kv_b, o, lse = fctx.saved_tensors
        dv, ex = fctx.dv, fctx.ex
        b, _, h, dqk = q.shape
        dc, dr = c.shape[-1], k_rot.shape[-1]
        dn = dqk - dr
        lat = ex.gather(torch.cat([c, k_rot], dim=-1)[None])[0]  # the forward's exchange once more
        k, v = _expand(lat, kv_b, h, dc, dv)
        qp, kp, vp = pad_heads(q, k, v)
        dop = torch.nn.functional.pad(do, (0, o.shape[-1] - dv))
        dq, dk, dvv = attention_backward(dop, qp, kp, vp, o, lse, fctx.mask, fctx.scale, fctx.block)
        n = lat.shape[1]
        # [dK_nope, dV] per head is the gradient of kv_b's output: fold it back through kv_b
        dkv = torch.cat([dk[..., :dn], dvv[..., :dv]], dim=-1).reshape(b, n, h * (dn + dv))
        d_c = dkv @ kv_b  # [B, N, Dc]
        d_kv_b = dkv.flatten(0, 1).T @ lat[:, :, 0, :dc].flatten(0, 1)  # this rank's share
        d_rot = shared_key_grad(dk[..., dn:dqk])
        dlat = ex.return_grad(torch.cat([d_c[:, :, None], d_rot], dim=-1)[None])[0]
        return dq[..., :dqk], dlat[..., :dc], dlat[..., dc:], d_kv_b, None, None, None, None, None


@dataclass
class LatentOptions:
    gather: str = "needed"  # needed (only the chunks this rank's queries see) | all

    def validate(self, where: str) -> None:
        if self.gather not in ("needed", "all"):
            raise ValueError(f"{where}.gather={self.gather!r} is unknown: choose needed or all")


@register("mla_latent", default="mla")
class MLALatent(Strategy):
    kinds = ("mla",)
    Options = LatentOptions

    def exchange(self, ctx, causal: bool, window: int | None) -> Exchange:
        """Who sends its latent to whom in this layer (no communication), as allgather's K/V."""
        p, me = ctx.world_size, ctx.rank
        if self.gather == "all":
            return Exchange(ctx.group, me, tuple(range(p)), tuple(r for r in range(p) if r != me), True)
        need = need_matrix(ctx, causal, window)
        sources = tuple(j for j in range(p) if need[me][j])
        targets = tuple(r for r in range(p) if r != me and need[r][me])
        return Exchange(ctx.group, me, sources, targets, False)

    def __call__(self, q, c, k_rot, ctx, *, kv_b, v_head_dim, causal=True, window=None, scale=None):
        if window is not None and window < 1:
            raise ValueError(f"attention window={window} must be >= 1 or None (model.sliding_window)")
        ex = self.exchange(ctx, causal, window)
        kv_index = torch.cat([ctx.index_of(j) for j in ex.sources])
        mask = MaskSpec(ctx.local_index, kv_index, ctx.local_doc, ctx.doc_of(kv_index), causal, window)
        if scale is None:
            scale = q.shape[-1] ** -0.5
        return LatentAttention.apply(q, c, k_rot, kv_b, v_head_dim, ex, mask, scale, ctx.block)

    def forward_bytes(self, shape: LayerShape) -> int:
        """(P-1) * B * C * (Dc + Dr) * e: the latent all-gather (``shape.latent_dim`` = Dc + Dr);
        gather=needed receives at most this."""
        s = shape
        if s.latent_dim is None:
            raise ValueError("LayerShape.latent_dim (Dc + Dr) is needed for mla_latent's bytes: set it for MLA layers")
        return (s.cp - 1) * s.batch * (s.seq_len // s.cp) * s.latent_dim * s.elem_bytes

    def backward_bytes(self, shape: LayerShape) -> int:
        """The latent gathered again plus the reduce-scatter of its gradient: 2 * forward."""
        return 2 * self.forward_bytes(shape)


@dataclass
class KVOptions:
    softmax: str = "allgather"  # the softmax strategy that moves the up-projected K/V

    def validate(self, where: str) -> None:
        served = sorted(n for n, cls in STRATEGIES.items() if "softmax" in cls.kinds)
        if self.softmax not in served:
            raise ValueError(f"{where}.softmax={self.softmax!r} is not a softmax strategy: choose one of {served}")


@register("mla_kv")
class MLAUpProjected(Strategy):
    kinds = ("mla",)
    Options = KVOptions

    def __init__(self, **options):
        super().__init__(**options)
        self.inner = build_strategy(self.softmax, "softmax")

    def check(self, *, n_heads: int, n_kv_heads: int, cp: int, seq_len: int, layout: str) -> None:
        self.inner.check(n_heads=n_heads, n_kv_heads=n_heads, cp=cp, seq_len=seq_len, layout=layout)

    def subgroup_sizes(self, cp: int, n_heads: int) -> list[int]:
        return self.inner.subgroup_sizes(cp, n_heads)

    def work_queries(self, ctx, n_heads: int, n_kv_heads: int, *, causal=True, window=None):
        return self.inner.work_queries(ctx, n_heads, n_heads, causal=causal, window=window)

    def __call__(self, q, c, k_rot, ctx, *, kv_b, v_head_dim, causal=True, window=None, scale=None):
        k, v = up_project(c, k_rot, kv_b, q.shape[2], v_head_dim)
        if scale is None:
            scale = q.shape[-1] ** -0.5
        return attend(self.inner, q, k, v, ctx, causal=causal, window=window, scale=scale)

    def forward_bytes(self, shape: LayerShape) -> int:
        """The inner softmax strategy's bytes for K/V of H heads of the padded width: ``shape``
        gives n_heads and head_dim = max(Dn + Dr, Dv)."""
        return self.inner.forward_bytes(replace(shape, n_kv_heads=shape.n_heads))
