"""Attention transfer (LoLCATs stage 1): teach each linear-attention layer to reproduce the
softmax attention of its own projections.

A converted layer keeps the teacher's q/k/v/o projections (k/v repeated per head when the
teacher used GQA, trainer/stages.py) and adds feature maps ``q_map`` / ``k_map``. Under
``AttentionTransfer`` the forward of every linear-kind mixer also computes the softmax
attention of the same projections (no gradient: the teacher), records

    mse_l = mean((linear_l(x) - softmax_l(x))^2)        x [B, T, dim], the layer's input

and passes the *softmax* output on, so every layer sees the teacher's hidden states
(layer-wise transfer, no next-token loss). The loss is the mean of mse_l over the layers.
The softmax runs through ``ctx.run("softmax", ...)``: any CP strategy serves it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from models.rope import apply_rotary


def teacher_attention(mixer, x, cos, sin, ctx, window=None) -> torch.Tensor:
    """Softmax attention with a linear mixer's q/k/v/o projections (RoPE as the softmax mixer
    applies it). x [B, T, dim] -> [B, T, dim]."""
    b, t, _ = x.shape
    n_kv = getattr(mixer, "n_kv", mixer.h)  # two-kind layers keep the teacher's GQA
    q = mixer.q_proj(x).view(b, t, mixer.h, mixer.d)
    k = mixer.k_proj(x).view(b, t, n_kv, mixer.d)
    v = mixer.v_proj(x).view(b, t, n_kv, mixer.d)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    o = ctx.run("softmax", q, k, v, causal=True, window=window)  # [B, T, H, D]
    return mixer.o_proj(o.reshape(b, t, mixer.h * mixer.d))


def converted_layers(model) -> list[str]:
    """Names of the layers whose mixer calls the ``linear`` kind (the student layers, two-kind
    layers such as lolcats included)."""
    return [name for name, block in model.layers.items() if "linear" in block.mixer.kinds]


class AttentionTransfer:
    """Context manager over a Transformer (unwrapped): while active, linear mixers record their
    MSE to the softmax teacher and hand the teacher's output on. ``loss()`` -> mean MSE."""

    def __init__(self, model, window=None):
        self.layers = converted_layers(model)
        if not self.layers:
            raise ValueError(
                "objective=attention_transfer needs linear-attention layers: set the stage's "
                "model.mixer_pattern, e.g. [linear, linear, linear, softmax]"
            )
        self.model, self.window, self.mse, self.handles = model, window, [], []

    def _hook(self, mixer, args, out):
        x, cos, sin, ctx = args
        with torch.no_grad():
            target = teacher_attention(mixer, x, cos, sin, ctx, self.window)
        self.mse.append((out.float() - target.float()).pow(2).mean())
        return target

    def __enter__(self):
        self.mse = []
        for name in self.layers:
            self.handles.append(self.model.layers[name].mixer.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def loss(self) -> torch.Tensor:
        return torch.stack(self.mse).mean()


def transfer_loss_value(loss: torch.Tensor, group=None) -> float:
    """The mean of every rank's loss (for logging; equal token counts per rank)."""
    x = loss.detach().clone()
    dist.all_reduce(x, group=group)
    return x.item() / dist.get_world_size(group)
