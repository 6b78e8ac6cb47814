"""Token-by-token reference for (gated) linear attention; autograd only.

Shapes:
    q, k          [B, T, H, Dk]
    v             [B, T, H, Dv]
    g             [B, T, H]       scalar log-decay per head, <= 0 (optional)
    gk            [B, T, H, Dk]   per-key log-decay (GLA), <= 0 (optional; adds to g)
    initial_state [B, H, Dk, Dv]  state before each row's first document (optional)
    cu_seqlens    [n_docs + 1]    document starts over the flattened [B * T] batch
    o             [B, T, H, Dv]   in q's dtype
    final_state   [B, H, Dk, Dv]  fp32 (fp64 for fp64 inputs): state after each row's last token

Recurrence (per row and head), with the state zeroed at every document start inside a row:
    S_t = diag(exp(g_t + gk_t)) S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t
The diagonal is included: token t sees itself.
"""

from __future__ import annotations

import torch

from models.ops.common import acc_dtype
from models.ops.documents import resets_from_cu_seqlens


def recurrent_linear_attention_ref(q, k, v, g=None, gk=None, scale: float = 1.0, initial_state=None, cu_seqlens=None):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    acc = acc_dtype(q)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    a = None  # log-decay [B, T, H, Dk or 1]
    if g is not None:
        a = g.to(acc)[..., None]
    if gk is not None:
        a = gk.to(acc) if a is None else a + gk.to(acc)
    resets = resets_from_cu_seqlens(cu_seqlens, b, t, q.device)
    state = q.new_zeros(b, h, dk, dv, dtype=acc) if initial_state is None else initial_state.to(acc)
    out = []
    for i in range(t):
        state = torch.where(resets[:, i, None, None, None], torch.zeros_like(state), state)
        if a is not None:
            state = state * a[:, i, :, :, None].exp()
        state = state + kf[:, i, :, :, None] * vf[:, i, :, None, :]
        out.append(scale * torch.einsum("bhk,bhkv->bhv", qf[:, i], state))
    return torch.stack(out, dim=1).to(q.dtype), state
