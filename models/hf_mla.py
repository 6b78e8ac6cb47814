"""Hugging Face DeepSeek-V2 / V3 attention (MLA) import and export; models/hf_io.py dispatches here.

Only dense layers are read: ``first_k_dense_replace`` must cover every layer (the MoE blocks
have no longctx equivalent). Name mapping of an MLA layer (ours <- Hugging Face, under
``layers.{i}.`` <- ``model.layers.{i}.``):

    mixer.q_proj.weight                 <- self_attn.q_proj.weight        (q_lora_rank null)
    mixer.q_a_proj.{weight,bias}        <- self_attn.q_a_proj.*           (q_lora_rank set)
    mixer.q_a_norm.weight               <- self_attn.q_a_layernorm.weight
    mixer.q_b_proj.weight               <- self_attn.q_b_proj.weight
    mixer.kv_a_proj.{weight,bias}       <- self_attn.kv_a_proj_with_mqa.*
    mixer.kv_a_norm.weight              <- self_attn.kv_a_layernorm.weight
    mixer.kv_b_proj.weight              <- self_attn.kv_b_proj.weight
    mixer.o_proj.{weight,bias}          <- self_attn.o_proj.*

RoPE layout: DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), ... (V3 with
``rope_interleave``, V2 always, as complex numbers); we rotate halves. Import permutes the
RoPE rows of q and of the shared key (evens first, then odds): q.k is unchanged because both
sides move the same way. Export writes ``deepseek_v3`` with ``rope_interleave: false`` and the
rows as they are.
"""

from __future__ import annotations

import torch

DEEPSEEK_TYPES = ("deepseek_v3", "deepseek_v2")

_MLA_MAP = {
    "mixer.q_proj.weight": "self_attn.q_proj.weight",
    "mixer.q_a_proj.weight": "self_attn.q_a_proj.weight",
    "mixer.q_a_proj.bias": "self_attn.q_a_proj.bias",
    "mixer.q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "mixer.q_b_proj.weight": "self_attn.q_b_proj.weight",
    "mixer.kv_a_proj.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "mixer.kv_a_proj.bias": "self_attn.kv_a_proj_with_mqa.bias",
    "mixer.kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "mixer.kv_b_proj.weight": "self_attn.kv_b_proj.weight",
    "mixer.o_proj.weight": "self_attn.o_proj.weight",
    "mixer.o_proj.bias": "self_attn.o_proj.bias",
}


def mla_config_kwargs(hf: dict) -> dict:
    """ModelConfig fields of a DeepSeek config.json beyond the Llama ones (models/hf_io.py reads
    those): one MLA mixer on every layer, head_dim = qk_rope_head_dim (the rotary table)."""
    n = hf["num_hidden_layers"]
    dense = hf.get("first_k_dense_replace", 0 if hf.get("model_type") == "deepseek_v2" else 3)
    if dense < n:
        raise ValueError(
            f"config.json ({hf.get('model_type')}) has first_k_dense_replace={dense} < num_hidden_layers={n}: "
            "layers from there on are mixture-of-experts, which longctx does not build; only checkpoints "
            "whose every layer has a dense MLP load (first_k_dense_replace >= num_hidden_layers)"
        )
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    return dict(
        n_kv_heads=hf["num_attention_heads"],  # MLA up-projects one K/V per query head
        head_dim=hf["qk_rope_head_dim"],
        mixer_pattern=["mla"],
        mla_q_lora_rank=hf.get("q_lora_rank"),
        mla_kv_lora_rank=hf["kv_lora_rank"],
        mla_qk_nope_head_dim=hf["qk_nope_head_dim"],
        mla_qk_rope_head_dim=hf["qk_rope_head_dim"],
        mla_v_head_dim=hf["v_head_dim"],
        mla_latent_norm=True,
        mla_latent_norm_eps=1e-6,  # DeepseekV*RMSNorm's default: the latents' norms get no config eps
        mla_mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0),
    )


def is_mla(cfg) -> bool:
    return any(cfg.mixer_of(i) == "mla" for i in range(cfg.n_layers))


def mla_layer_names(cfg, layer: int) -> dict[str, str]:
    """Our names -> Hugging Face names of layer ``layer``'s MLA attention tensors."""
    from models.registry import options_of

    opts = options_of(cfg, "mla")
    skip = {"mixer.q_a_proj.", "mixer.q_a_norm.", "mixer.q_b_proj."} if opts.q_lora_rank is None else {"mixer.q_proj."}
    if not opts.latent_norm:
        skip |= {"mixer.q_a_norm.", "mixer.kv_a_norm."}
    out = {}
    for ours, theirs in _MLA_MAP.items():
        if any(ours.startswith(s) for s in skip) or (ours.endswith(".bias") and not cfg.attention_bias):
            continue
        out[f"layers.{layer}.{ours}"] = f"model.layers.{layer}.{theirs}"
    return out


def _deinterleave(w: torch.Tensor, rope_dim: int, heads: int) -> torch.Tensor:
    """The last ``rope_dim`` rows of each of ``heads`` row blocks reordered evens, then odds."""
    perm = torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)])
    blocks = w.reshape(heads, -1, *w.shape[1:])
    rope = blocks[:, -rope_dim:][:, perm]
    return torch.cat([blocks[:, :-rope_dim], rope], dim=1).reshape(w.shape)


def mla_state_from_hf(cfg, hf: dict, state: dict) -> dict:
    """Permute the RoPE rows of interleaved checkpoints into our rotate-half layout."""
    if hf.get("model_type") == "deepseek_v3" and not hf.get("rope_interleave", True):
        return state
    from models.registry import options_of

    dr = options_of(cfg, "mla").qk_rope_head_dim
    out = dict(state)
    for i in range(cfg.n_layers):
        q = f"layers.{i}.mixer.q_proj.weight"
        if q not in out:
            q = f"layers.{i}.mixer.q_b_proj.weight"
        out[q] = _deinterleave(out[q], dr, cfg.n_heads)
        for name in ("weight", "bias"):
            kv = f"layers.{i}.mixer.kv_a_proj.{name}"
            if kv in out:
                out[kv] = _deinterleave(out[kv], dr, 1)
    return out


def mla_config_to_hf(cfg) -> dict:
    """The DeepSeek-V3 config.json entries of an all-MLA model with dense MLPs."""
    from models.registry import options_of

    if not all(cfg.mixer_of(i) == "mla" for i in range(cfg.n_layers)):
        raise ValueError(
            f"model.mixer_pattern={cfg.mixer_pattern}: deepseek_v3 export needs mla on every layer "
            "(transformers' DeepseekV3 has no other attention)"
        )
    if cfg.sliding_window is not None:
        raise ValueError(f"model.sliding_window={cfg.sliding_window}: deepseek_v3 has no sliding window to export")
    opts = options_of(cfg, "mla")
    dc, dn, dr, dv = opts.dims(cfg)
    if dr != cfg.hd:
        raise ValueError(
            f"model.mla_qk_rope_head_dim={dr} differs from model.head_dim={cfg.hd}: transformers builds "
            "DeepSeek's rotary table qk_rope_head_dim wide; set model.head_dim to it"
        )
    if not opts.latent_norm or opts.latent_norm_eps != 1e-6:
        raise ValueError(
            "deepseek_v3 export needs model.mla_latent_norm=true with model.mla_latent_norm_eps=1e-6 "
            "(transformers' latent norms)"
        )
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "num_key_value_heads": cfg.n_heads,
        "head_dim": dr,
        "q_lora_rank": opts.q_lora_rank,
        "kv_lora_rank": dc,
        "qk_nope_head_dim": dn,
        "qk_rope_head_dim": dr,
        "v_head_dim": dv,
        "rope_interleave": False,
        "first_k_dense_replace": cfg.n_layers,
        "moe_intermediate_size": cfg.ffn,
        "n_routed_experts": 1,
        "n_shared_experts": 1,
        "num_experts_per_tok": 1,
        "n_group": 1,
        "topk_group": 1,
        "attention_bias": cfg.attention_bias,
    }
