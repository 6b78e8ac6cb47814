"""Upcycling softmax (GQA) layers into multi-head latent attention by SVD (X-EcoMLA).

When a stage (or ``init_from``) turns a softmax layer into ``mla`` (trainer/stages.py
``carry_weights``), the MLA weights start from the layer's pretrained projections. Shapes:
teacher head dim D, H query heads, Hkv KV heads; the MLA layer has Dr = ``model.mla_qk_rope_head_dim``
RoPE dims, Dn = D - Dr no-RoPE dims and Dv = D (o_proj is copied as is).

    RoPE dims       per head the rotate-half pairs of the *first Dr / 2 frequencies* (columns
                    j and D/2 + j, j < Dr / 2: the highest frequencies, which carry position);
                    the other D - Dr dims keep their weights but lose RoPE
    query           full rank: each head's rows reordered [no-RoPE dims, RoPE dims] (exact);
                    q_lora_rank r: SVD of that matrix, q_a = S_r V_r^T, q_b = U_r
    RoPE key        the mean over KV heads of W_k's RoPE rows (one key shared by all heads)
    latent          joint SVD of [W_k no-RoPE rows; W_v], each KV head repeated for the query
                    heads it serves: kv_a = S_r V_r^T (r = kv_lora_rank), kv_b = U_r per head
                    [k_nope rows, v rows]; no latent norm (``model.mla_latent_norm=false``: a
                    norm would rescale the latent away from the SVD's)

What we follow from X-EcoMLA (arXiv 2503.11132 and its released code): the joint SVD of the
repeated [K; V] for the latent with kv_b = U, kv_a = S V^T; the SVD of W_q for a low-rank query;
the RoPE key as the mean of the KV heads' RoPE rows. Where we differ: X-EcoMLA takes the *last*
Dr rows of each head as the RoPE part and builds a new rotary table Dr wide; we take the rows of
the first Dr / 2 frequency pairs and keep the teacher's own frequencies (the MLA layer reads them
from the model's rotary table), so with Dr = D and one KV head the upcycled layer is the teacher
layer exactly (at full latent rank), and otherwise only the dropped RoPE of the low frequencies,
the averaged RoPE key and the truncated rank differ.
"""

from __future__ import annotations

import torch

from models.mla_attention import MultiHeadLatentAttention
from models.registry import options_of


def rope_dims(head_dim: int, rope_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(no-RoPE dims, RoPE dims) of one teacher head, the RoPE ones in rotate-half order."""
    half = torch.arange(rope_dim // 2)
    rope = torch.cat([half, head_dim // 2 + half])
    keep = torch.ones(head_dim, dtype=torch.bool)
    keep[rope] = False
    return keep.nonzero().flatten(), rope


def svd_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [m, n] -> (U_r [m, r], S_r V_r^T [r, n]) in float64, zero-padded when r > min(m, n)."""
    u, s, vt = torch.linalg.svd(w.double(), full_matrices=False)
    r = min(rank, s.numel())
    up, down = u[:, :r], s[:r, None] * vt[:r]
    if rank > r:
        up = torch.cat([up, up.new_zeros(up.shape[0], rank - r)], dim=1)
        down = torch.cat([down, down.new_zeros(rank - r, down.shape[1])], dim=0)
    return up, down


def check_shapes(cfg, layer: int, mixer: MultiHeadLatentAttention, d: int) -> None:
    opts = options_of(cfg, "mla")
    where = f"layer {layer} (softmax -> mla)"
    if mixer.dn + mixer.dr != d or mixer.dv != d:
        raise ValueError(
            f"{where}: SVD initialisation needs model.mla_qk_nope_head_dim + model.mla_qk_rope_head_dim = "
            f"model.mla_v_head_dim = the softmax head dim {d} (got {mixer.dn} + {mixer.dr}, {mixer.dv})"
        )
    if opts.latent_norm:
        raise ValueError(f"{where}: SVD initialisation needs model.mla_latent_norm=false (a norm rescales the latent)")
    if cfg.attention_bias:
        raise ValueError(
            f"{where}: model.attention_bias=true (Qwen2's q/k/v biases) has no place in MLA's projections: "
            "upcycling supports bias-free attention (Llama) only"
        )


@torch.no_grad()
def init_layer(mixer: MultiHeadLatentAttention, wq, wk, wv, wo, n_kv: int, head_dim: int) -> dict[str, float]:
    """Set ``mixer``'s weights from one softmax layer's q/k/v/o [out, dim]; returns the relative
    Frobenius error of the truncated factorisations (0 at full rank)."""
    h, d, dr = mixer.n_heads, head_dim, mixer.dr
    nope, rope = rope_dims(d, dr)
    dim = wq.shape[1]
    q = wq.double().view(h, d, dim)
    q = torch.cat([q[:, nope], q[:, rope]], dim=1).reshape(h * d, dim)
    errs = {}
    if hasattr(mixer, "q_proj"):
        mixer.q_proj.weight.copy_(q)
    else:
        up, down = svd_factors(q, mixer.q_a_proj.out_features)
        mixer.q_a_proj.weight.copy_(down)
        mixer.q_b_proj.weight.copy_(up)
        errs["q"] = ((up @ down - q).norm() / q.norm()).item()
    k = wk.double().view(n_kv, d, dim)
    v = wv.double().view(n_kv, d, dim)
    group = h // n_kv
    # per query head: [k_nope rows (Dn), v rows (Dv)], KV heads repeated for their query heads
    kv = torch.cat([k[:, nope], v], dim=1).repeat_interleave(group, dim=0).reshape(-1, dim)
    up, down = svd_factors(kv, mixer.dc)
    errs["kv"] = ((up @ down - kv).norm() / kv.norm()).item()
    k_rot = k[:, rope].mean(dim=0)  # [Dr, dim]: the shared RoPE key
    mixer.kv_a_proj.weight.copy_(torch.cat([down, k_rot], dim=0))
    mixer.kv_b_proj.weight.copy_(up)
    mixer.o_proj.weight.copy_(wo)
    return errs


@torch.no_grad()
def svd_init_mla(src: dict[str, torch.Tensor], model) -> dict[int, dict[str, float]]:
    """Every MLA layer of ``model`` whose layer in ``src`` (parameter name -> tensor) was softmax
    attention (has q/k/v/o_proj) starts from their SVD; returns {layer: errors}."""
    cfg, out = model.cfg, {}
    for i, block in model.layers.items():
        mixer = block.mixer
        pre = f"layers.{i}.mixer."
        if not isinstance(mixer, MultiHeadLatentAttention) or f"{pre}k_proj.weight" not in src:
            continue
        wq, wk, wv, wo = (src[f"{pre}{p}_proj.weight"] for p in "qkvo")
        d = wo.shape[1] // cfg.n_heads
        check_shapes(cfg, int(i), mixer, d)
        n_kv = wk.shape[0] // d
        out[int(i)] = init_layer(mixer, wq, wk, wv, wo, n_kv, d)
    return out
