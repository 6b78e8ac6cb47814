"""Hugging Face checkpoint import / export for Llama, Qwen2 and Mistral decoders.

Plain PyTorch + safetensors + json: reads and writes the Hugging Face on-disk format
(``config.json`` + ``model.safetensors`` or a sharded ``model.safetensors.index.json``)
without importing ``transformers`` or ``torch.distributed``.

    config_from_hf(hf_config_dict)           -> ModelConfig
    read_hf_config(path)                     -> (ModelConfig, the fields config.json defines)
    merge_config(checkpoint, user, explicit) -> (ModelConfig to build, the overrides applied)
    load_hf_checkpoint(path)                 -> (ModelConfig, state_dict in our names)
    load_hf_model(path, **overrides)         -> Transformer
    save_hf_checkpoint(model, path, model_type="llama")

Name mapping (ours <- Hugging Face):

    embed.weight                        <- model.embed_tokens.weight
    layers.{i}.attn_norm.weight         <- model.layers.{i}.input_layernorm.weight
    layers.{i}.mixer.{q,k,v,o}_proj.*   <- model.layers.{i}.self_attn.{q,k,v,o}_proj.*
    layers.{i}.ffn_norm.weight          <- model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.ffn.{gate,up,down}_proj  <- model.layers.{i}.mlp.{gate,up,down}_proj.weight
    norm.weight                         <- model.norm.weight
    lm_head.weight                      <- lm_head.weight (absent when embeddings are tied)

Our RoPE uses the Hugging Face rotate-half convention, so q/k weights are copied as is.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.config import ModelConfig, RopeConfig
from models.hf_mla import (
    DEEPSEEK_TYPES,
    is_mla,
    mla_config_kwargs,
    mla_config_to_hf,
    mla_layer_names,
    mla_state_from_hf,
)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", *DEEPSEEK_TYPES)  # deepseek: models/hf_mla.py
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
_ARCHITECTURES["deepseek_v3"] = "DeepseekV3ForCausalLM"
_CONFIG = "config.json"
_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"

# per-layer names: ours -> Hugging Face (without the "model.layers.{i}." / "layers.{i}." prefix)
_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "mixer.q_proj.weight": "self_attn.q_proj.weight",
    "mixer.k_proj.weight": "self_attn.k_proj.weight",
    "mixer.v_proj.weight": "self_attn.v_proj.weight",
    "mixer.o_proj.weight": "self_attn.o_proj.weight",
    "mixer.q_proj.bias": "self_attn.q_proj.bias",
    "mixer.k_proj.bias": "self_attn.k_proj.bias",
    "mixer.v_proj.bias": "self_attn.v_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.gate_proj.weight": "mlp.gate_proj.weight",
    "ffn.up_proj.weight": "mlp.up_proj.weight",
    "ffn.down_proj.weight": "mlp.down_proj.weight",
}
_GLOBAL_MAP = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# tensors some checkpoints carry that hold no learned state (recomputed from the config)
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


# --------------------------------------------------------------------------- config


def _rope_from_hf(hf: dict) -> RopeConfig:
    """RoPE settings from either the transformers 5 ``rope_parameters`` dict or the older
    ``rope_theta`` + ``rope_scaling`` pair."""
    # transformers gives rope_scaling precedence when both are present
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ValueError(f"config.json rope settings {params!r} are not a dict")
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(
            "config.json has per-layer-type rope_parameters "
            f"({sorted(params)}): only one RoPE for all layers is supported"
        )
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("config.json sets partial_rotary_factor != 1: partial RoPE is not supported")
    max_pos = hf.get("max_position_embeddings")
    # like transformers: a top-level original_max_position_embeddings wins, then the rope dict,
    # then max_position_embeddings
    orig = hf.get("original_max_position_embeddings", params.get("original_max_position_embeddings", max_pos))
    rope = RopeConfig(theta=float(theta))
    if orig is not None:
        rope.original_max_position = int(orig)
    if kind == "default":
        return rope
    if kind == "dynamic":
        raise ValueError(
            "config.json uses rope_type='dynamic' (dynamic NTK scaling), which is not "
            "supported: its frequencies change with the sequence length. Use the static "
            "variant instead: remove rope_scaling / rope_parameters from config.json and "
            "set model.rope.type=ntk with model.rope.factor="
            f"{params.get('factor', '<factor>')}"
        )
    if kind not in ("linear", "yarn", "llama3"):
        raise ValueError(
            f"config.json uses rope_type={kind!r}, which is not supported: supported "
            "types are default, linear, yarn and llama3"
        )
    factor = params.get("factor")
    if kind == "yarn" and factor is None and max_pos and orig:
        factor = max_pos / orig  # transformers' fallback
    if factor is None:
        raise ValueError(f"config.json rope_type={kind!r} has no 'factor'")
    rope.type, rope.factor = kind, float(factor)
    if kind == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if key not in params:
                raise ValueError(f"config.json rope_type='llama3' is missing {key!r}")
        rope.low_freq_factor = float(params["low_freq_factor"])
        rope.high_freq_factor = float(params["high_freq_factor"])
    elif kind == "yarn":
        if params.get("truncate", True) is False:
            raise ValueError(
                "config.json rope_type='yarn' sets truncate=false, which is not supported "
                "(models/rope.py always rounds the correction range like the YaRN paper)"
            )
        rope.beta_fast = float(params.get("beta_fast") or 32.0)
        rope.beta_slow = float(params.get("beta_slow") or 1.0)
        attn = params.get("attention_factor")
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        if attn is None and mscale and mscale_all:  # DeepSeek-style, as transformers computes it

            def get_mscale(scale, m=1.0):
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

            attn = get_mscale(rope.factor, mscale) / get_mscale(rope.factor, mscale_all)
        rope.attention_factor = None if attn is None else float(attn)
    return rope


def _sliding_window_from_hf(hf: dict, model_type: str) -> int | None:
    if model_type == "llama":
        return None
    window = hf.get("sliding_window")
    if model_type == "mistral":
        return None if window is None else int(window)
    # qwen2: only when use_sliding_window, and only on layers >= max_window_layers (or per layer_types)
    if not hf.get("use_sliding_window", False) or window is None:
        return None
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention" for i in range(n)
    ]
    sliding = [t == "sliding_attention" for t in types]
    if all(sliding):
        return int(window)
    if not any(sliding):
        return None
    raise ValueError(
        f"config.json (qwen2) mixes sliding-window and full-attention layers "
        f"(layer_types={types}): one sliding_window for all layers is supported"
    )


S2_KEY = "longctx_s2"  # config.json entry of an S2 model: its mixer pattern and s2_* settings
_S2_FIELDS = ("block", "stride", "local", "dense_heads", "offsets", "homogeneous", "layer_offset")
_S2_FIELDS += ("n_dense_heads", "head_step", "doc_blocks")
# a config.json written before head_step / doc_blocks existed meant these (and layer_offset None: the layer index)
_S2_LEGACY = {"head_step": "spread", "doc_blocks": "row"}


def _s2_to_hf(cfg: ModelConfig) -> dict:
    """The S2 settings for config.json (transformers ignores the key: there the model loads as
    its dense self; longctx reloads the pattern)."""
    from models.registry import options_of

    opts = options_of(cfg, "s2")  # the defaults filled in: config.json states every setting
    out = {"mixer_pattern": list(cfg.mixer_pattern)}
    out.update({f: getattr(opts, f) for f in _S2_FIELDS})
    out["dense_heads"] = list(out["dense_heads"])
    return out


# Phi-3-small's blocksparse settings (config.json keys): its layout is DKernel's rule with a
# constant offset 1, (j + h * max(1, stride // n_heads) + 1) % stride for head h, per query head
PHI3_KEYS = (
    "blocksparse_block_size",
    "blocksparse_num_local_blocks",
    "blocksparse_vert_stride",
    "blocksparse_homo_head_pattern",
    "dense_attention_every_n_layers",
)


def _s2_from_phi3small(hf: dict) -> dict:
    """The S2 settings (and mixer pattern) of a config.json with Phi-3-small's blocksparse keys:
    layers (i + 1) % dense_attention_every_n_layers == 0 dense, the others S2 with its block,
    local blocks and stride, step from the query heads, offset 1, blocks restarting per
    sequence. Its layout is per *query* head: under GQA only the homogeneous one is a per-KV-head
    pattern."""
    if not any(k in hf for k in PHI3_KEYS):
        return {}
    heads = hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or heads
    homo = bool(hf.get("blocksparse_homo_head_pattern", False))
    if not homo and kv != heads:
        raise ValueError(
            f"config.json has Phi-3-small blocksparse heads with blocksparse_homo_head_pattern=false and "
            f"{heads} query heads over {kv} KV heads: its layout differs between query heads that share "
            "a KV head, which longctx's per-KV-head S2 patterns cannot express; use a homogeneous pattern "
            "or as many KV heads as query heads"
        )
    every = int(hf.get("dense_attention_every_n_layers") or 0)
    mixers = ["s2"] * (every - 1) + ["softmax"] if every > 1 else ["softmax" if every == 1 else "s2"]
    return dict(
        mixer_pattern=mixers,
        s2_block=int(hf.get("blocksparse_block_size", 64)),
        s2_local=int(hf.get("blocksparse_num_local_blocks", 4)),
        s2_stride=int(hf.get("blocksparse_vert_stride", 4)),
        s2_homogeneous=homo,
        s2_head_step="dkernel",
        s2_layer_offset="1",
        s2_doc_blocks="document",
    )


def _s2_to_phi3small(cfg: ModelConfig) -> dict:
    """Phi-3-small's blocksparse keys for config.json when the model's S2 layers are its layout
    (offset 1, step from the query heads, per-document blocks, no dense heads or explicit
    offsets, dense layers every n-th); {} otherwise (the longctx_s2 entry holds the settings)."""
    from models.registry import options_of

    o = options_of(cfg, "s2")
    n = len(cfg.mixer_pattern)
    every = n if cfg.mixer_pattern == ["s2"] * (n - 1) + ["softmax"] and n > 1 else None
    if cfg.mixer_pattern == ["s2"]:
        every = 0
    same_heads = o.homogeneous or cfg.n_heads == cfg.n_kv_heads
    plain = not o.dense_heads and not o.n_dense_heads and o.offsets is None
    rule = o.head_step == "dkernel" and str(o.layer_offset) == "1" and o.doc_blocks == "document"
    if every is None or not (same_heads and plain and rule):
        return {}
    return dict(
        blocksparse_block_size=o.block,
        blocksparse_num_local_blocks=o.local,
        blocksparse_vert_stride=o.stride,
        blocksparse_homo_head_pattern=bool(o.homogeneous),
        dense_attention_every_n_layers=every,
    )


def _s2_from_hf(hf: dict) -> dict:
    s2 = hf.get(S2_KEY)
    if not s2:
        return _s2_from_phi3small(hf)
    unknown = sorted(set(s2) - {"mixer_pattern", *_S2_FIELDS})
    if unknown:
        raise ValueError(f"config.json {S2_KEY} has unknown keys {unknown}: expected mixer_pattern and {_S2_FIELDS}")
    if "head_step" not in s2:  # an older longctx export: keep the pattern it trained with
        s2 = {**_S2_LEGACY, **s2, "layer_offset": "layer" if s2.get("layer_offset") is None else s2["layer_offset"]}
    out = {f"s2_{f}": s2[f] for f in _S2_FIELDS if f in s2}
    if out.get("s2_layer_offset") is not None:
        out["s2_layer_offset"] = str(out["s2_layer_offset"])
    if "mixer_pattern" in s2:
        out["mixer_pattern"] = list(s2["mixer_pattern"])
    return out


def config_from_hf(hf_config: dict) -> ModelConfig:
    """Our ModelConfig from a Hugging Face ``config.json`` dict (llama, qwen2, mistral)."""
    hf = hf_config
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"config.json has model_type={model_type!r}, which is not supported: "
            f"supported model types are {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json has hidden_act={act!r}: only silu (SwiGLU) is supported")
    if hf.get("mlp_bias", False):
        raise ValueError("config.json has mlp_bias=true: MLP biases are not supported")
    try:
        heads = hf["num_attention_heads"]
        kwargs = dict(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim"),
            ffn_dim=hf["intermediate_size"],
        )
        if model_type in DEEPSEEK_TYPES:  # MLA attention, dense MLPs only
            kwargs.update(mla_config_kwargs(hf))
    except KeyError as e:
        raise ValueError(f"config.json is missing {e.args[0]!r}") from None
    from models.hybrid_attention import hybrid_from_hf

    return ModelConfig(
        **kwargs,
        **{**_s2_from_hf(hf), **hybrid_from_hf(hf)},
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
        sliding_window=_sliding_window_from_hf(hf, model_type),
        rope=_rope_from_hf(hf),
    )


# ModelConfig fields every supported config.json defines (config_from_hf reads them); the
# others (non-attention mixers, linear_*, init_std, ...) are longctx's own settings
HF_FIELDS = (
    "vocab_size",
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "ffn_dim",
    "norm_eps",
    "tie_embeddings",
    "attention_bias",
    "sliding_window",
    "rope",
)
# fields that change which tensors exist or their shapes: an override can not load the weights
_SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim")
_SHAPE_FIELDS += ("tie_embeddings", "attention_bias")


def read_hf_config(path: str) -> tuple[ModelConfig, tuple[str, ...]]:
    """(ModelConfig, the ModelConfig fields the checkpoint defines) from ``path/config.json``."""
    config_file = os.path.join(os.fspath(path), _CONFIG)
    if not os.path.isfile(config_file):
        raise _missing(os.fspath(path), f"{_CONFIG} is missing")
    with open(config_file) as f:
        hf = json.load(f)
    mla = tuple(mla_config_kwargs(hf)) if hf.get("model_type") in DEEPSEEK_TYPES else ()
    from models.hybrid_attention import hybrid_from_hf

    return config_from_hf(hf), HF_FIELDS + tuple(dict.fromkeys([*_s2_from_hf(hf), *hybrid_from_hf(hf)])) + mla


def _effective(cfg: ModelConfig, name: str):
    return {"head_dim": cfg.hd, "ffn_dim": cfg.ffn}.get(name, getattr(cfg, name))


def merge_config(
    checkpoint: ModelConfig, user: ModelConfig, explicit: set[str], defined: tuple[str, ...] = HF_FIELDS
) -> tuple[ModelConfig, list[str]]:
    """The model to build from a checkpoint: every field the checkpoint ``defined`` from it, the
    user's ``explicit`` settings on top, every other field from ``user``.

    ``explicit``: ModelConfig field names the user set (``rope`` or ``rope.theta`` style for the
    RoPE settings). Returns (config, ``name=value`` of each explicit setting that differs from
    the checkpoint). ValueError when an explicit setting changes a parameter's shape.
    """
    out, overridden = {}, []
    for name in defined:
        ours, theirs = getattr(user, name), getattr(checkpoint, name)
        if name == "rope":
            rope = {}
            for f in dataclasses.fields(RopeConfig):
                mine, ckpt = getattr(ours, f.name), getattr(theirs, f.name)
                use = "rope" in explicit or f"rope.{f.name}" in explicit
                rope[f.name] = mine if use else ckpt
                if use and mine != ckpt:
                    overridden.append(f"rope.{f.name}={mine}")
            out["rope"] = RopeConfig(**rope)
            continue
        if name not in explicit:
            out[name] = theirs
            continue
        if name in _SHAPE_FIELDS and _effective(user, name) != _effective(checkpoint, name):
            raise ValueError(
                f"model.{name}={ours} differs from the checkpoint's {_effective(checkpoint, name)}, "
                f"which its weights need: remove model.{name} from your settings (command line, "
                "experiment or model group) to take the checkpoint's"
            )
        out[name] = ours
        if ours != theirs:
            overridden.append(f"{name}={ours}")
    return dataclasses.replace(user, **out), overridden


def _rope_to_hf(rope: RopeConfig, head_dim: int) -> dict:
    """transformers 5 ``rope_parameters`` dict for our RopeConfig (ntk -> changed plain theta)."""
    if rope.type in ("none", "ntk"):
        theta = rope.theta
        if rope.type == "ntk":  # same expression as models/rope.py
            theta = theta * rope.factor ** (head_dim / (head_dim - 2))
        return {"rope_type": "default", "rope_theta": theta}
    out = {"rope_type": rope.type, "rope_theta": rope.theta, "factor": rope.factor}
    if rope.type == "llama3":
        out.update(
            low_freq_factor=rope.low_freq_factor,
            high_freq_factor=rope.high_freq_factor,
            original_max_position_embeddings=rope.original_max_position,
        )
    elif rope.type == "yarn":
        out.update(
            beta_fast=rope.beta_fast,
            beta_slow=rope.beta_slow,
            original_max_position_embeddings=rope.original_max_position,
        )
        if rope.attention_factor is not None:
            out["attention_factor"] = float(rope.attention_factor)
    return out


def config_to_hf(
    cfg: ModelConfig,
    model_type: str = "llama",
    dtype: torch.dtype = torch.float32,
    max_position_embeddings: int | None = None,
) -> dict:
    """A ``config.json`` dict that transformers' AutoConfig / AutoModelForCausalLM can load."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type={model_type!r} is not supported for export: choose one of {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    from models.mixers import mixer_class

    other = [m for m in cfg.mixer_pattern if not mixer_class(m).hf_attention]
    if other and model_type != "deepseek_v3":
        raise ValueError(
            f"model.mixer_pattern={cfg.mixer_pattern} has mixers {other}, which have "
            "no Hugging Face equivalent: export needs mixers with Hugging Face attention weights (softmax, s2)"
        )
    if cfg.sliding_window is not None and model_type == "llama":
        raise ValueError(
            f"model.sliding_window={cfg.sliding_window} cannot be exported as llama (no "
            "sliding window there): use model_type='mistral' or 'qwen2'"
        )
    if cfg.attention_bias and model_type == "mistral":
        raise ValueError(
            "model.attention_bias=true cannot be exported as mistral (no q/k/v biases "
            "there): use model_type='qwen2' or 'llama'"
        )
    rope = _rope_to_hf(cfg.rope, cfg.hd)
    if max_position_embeddings is None:
        scaled = cfg.rope.type in ("linear", "yarn", "llama3")
        max_position_embeddings = int(cfg.rope.original_max_position * (cfg.rope.factor if scaled else 1))
    hf = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.hd,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope,
        # the pre-transformers-5 spelling of the same settings, for older readers
        "rope_theta": rope["rope_theta"],
        "rope_scaling": None
        if rope["rope_type"] == "default"
        else {k: v for k, v in rope.items() if k != "rope_theta"},
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if "s2" in cfg.mixer_pattern:
        hf[S2_KEY] = _s2_to_hf(cfg)
        hf.update(_s2_to_phi3small(cfg))
    if model_type == "deepseek_v3":
        hf.update(mla_config_to_hf(cfg))
        if rope["rope_type"] == "yarn":  # DeepSeek's softmax-scale mscale
            for d in (hf["rope_parameters"], hf["rope_scaling"]):
                d["mscale_all_dim"] = cfg.mla_mscale_all_dim or 0.0
    from models.hybrid_attention import hybrid_to_hf

    hf.update(hybrid_to_hf(cfg))  # mixers with settings to keep (liger, landmark): pattern and settings
    if model_type == "llama":
        hf.update(attention_bias=cfg.attention_bias, mlp_bias=False)
    elif model_type == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    elif model_type == "qwen2":  # q/k/v biases always present; the window applies to every layer or none
        sliding = cfg.sliding_window is not None
        hf.update(
            use_sliding_window=sliding,
            sliding_window=cfg.sliding_window,
            max_window_layers=0 if sliding else cfg.n_layers,
            layer_types=[("sliding_attention" if sliding else "full_attention")] * cfg.n_layers,
        )
    return hf


# --------------------------------------------------------------------------- import


def _missing(path: str, what: str) -> ValueError:
    return ValueError(
        f"Hugging Face checkpoint {path!r}: {what}. It must be a local directory "
        f"holding {_CONFIG} and {_WEIGHTS} (or a sharded {_INDEX}): fix the path"
    )


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    single, index = os.path.join(path, _WEIGHTS), os.path.join(path, _INDEX)
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise _missing(path, f"{_INDEX} has no 'weight_map'")
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
        for file in files:
            if not os.path.isfile(file):
                raise _missing(path, f"shard {os.path.basename(file)} listed in {_INDEX} is missing")
    else:
        other = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth"))]
        hint = (
            (
                f" (found {', '.join(sorted(other))}: only safetensors is read; convert with "
                "transformers' save_pretrained(..., safe_serialization=True))"
            )
            if other
            else ""
        )
        raise _missing(path, f"neither {_WEIGHTS} nor {_INDEX} exists{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key in tensors:
                    raise ValueError(f"tensor {key!r} appears in more than one shard of {path!r}")
                tensors[key] = f.get_tensor(key)
    if os.path.isfile(index) and not os.path.isfile(single):
        listed = set(weight_map)
        if listed != set(tensors):
            diff = sorted(listed ^ set(tensors))[:5]
            raise ValueError(f"{_INDEX} in {path!r} does not match its shards (e.g. {diff})")
    return tensors


def _hf_names(cfg: ModelConfig) -> dict[str, str]:
    """Our parameter name -> Hugging Face tensor name, for every parameter of Transformer(cfg)."""
    names = {"embed.weight": _GLOBAL_MAP["embed.weight"], "norm.weight": _GLOBAL_MAP["norm.weight"]}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.n_layers):
        mla = cfg.mixer_of(i) == "mla"
        if mla:
            names.update(mla_layer_names(cfg, i))
        for ours, theirs in _LAYER_MAP.items():
            if (ours.endswith(".bias") and not cfg.attention_bias) or (mla and ours.startswith("mixer.")):
                continue
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


def load_hf_checkpoint(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face checkpoint directory -> (ModelConfig, state dict in our names).

    Strict: every tensor must map to one of our parameters and every parameter must be
    present; the tensors keep the dtype they were stored in.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise _missing(path, "the directory does not exist" if not os.path.exists(path) else "it is not a directory")
    config_file = os.path.join(path, _CONFIG)
    if not os.path.isfile(config_file):
        raise _missing(path, f"{_CONFIG} is missing")
    with open(config_file) as f:
        hf = json.load(f)
    cfg = config_from_hf(hf)
    tensors = _read_tensors(path)
    tensors = {k: v for k, v in tensors.items() if not _IGNORED.match(k)}

    if cfg.tie_embeddings and "lm_head.weight" in tensors:  # some exporters write the tied copy
        if not torch.equal(tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight")):
            raise ValueError(
                f"{path!r}: tie_word_embeddings=true but lm_head.weight differs from "
                "model.embed_tokens.weight; set tie_word_embeddings=false in config.json"
            )
        del tensors["lm_head.weight"]
    if hf.get("model_type") == "llama" and cfg.attention_bias:
        # Llama's attention_bias also adds an o_proj bias, which our attention lacks: accept it
        # only when it is zero (as save_hf_checkpoint writes it)
        for i in range(cfg.n_layers):
            b = tensors.pop(f"model.layers.{i}.self_attn.o_proj.bias", None)
            if b is not None and torch.count_nonzero(b):
                raise ValueError(
                    f"{path!r}: model.layers.{i}.self_attn.o_proj.bias is non-zero; o_proj biases are not supported"
                )

    names = _hf_names(cfg)
    missing = sorted(theirs for theirs in names.values() if theirs not in tensors)
    unexpected = sorted(set(tensors) - set(names.values()))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path!r} does not match its config.json "
            f"(model_type={hf.get('model_type')}): missing tensors {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected tensors {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )
    state = {ours: tensors[theirs] for ours, theirs in names.items()}
    if is_mla(cfg):
        state = mla_state_from_hf(cfg, hf, state)
    return cfg, state


def load_hf_model(path: str, **overrides) -> torch.nn.Module:
    """Transformer with the weights of a Hugging Face checkpoint.

    ``overrides`` replace ModelConfig fields that do not change parameter shapes, e.g.
    ``sliding_window=4096`` or ``rope={"type": "yarn", "factor": 4.0}`` (a dict updates the
    imported RopeConfig; a RopeConfig replaces it). Parameters keep our default dtype (fp32).
    """
    from models.llama import Transformer

    cfg, state = load_hf_checkpoint(path)
    if overrides:
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"load_hf_model got unknown ModelConfig fields {unknown}: choose among {sorted(fields)}")
        rope = overrides.get("rope")
        if isinstance(rope, dict):
            rope_fields = {f.name for f in dataclasses.fields(RopeConfig)}
            bad = sorted(set(rope) - rope_fields)
            if bad:
                raise ValueError(f"load_hf_model got unknown rope fields {bad}: choose among {sorted(rope_fields)}")
            overrides = {**overrides, "rope": dataclasses.replace(cfg.rope, **rope)}
        cfg = dataclasses.replace(cfg, **overrides)
    model = Transformer(cfg)
    model.load_state_dict(state, strict=True)
    return model


# --------------------------------------------------------------------------- export


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def _write_file(directory: str, name: str, write) -> None:
    """``write(tmp_path)`` becomes ``directory/name`` all at once (models/files.py)."""
    from models.files import write_atomic

    write_atomic(os.path.join(directory, name), write)


def save_hf_checkpoint(
    model,
    path: str,
    model_type: str = "llama",
    max_position_embeddings: int | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write ``model`` (our Transformer) as a Hugging Face checkpoint directory.

    ``state_dict``: whole tensors by our parameter names (default: the model's parameters). A
    model whose parameters are sharded (FSDP2) passes ``parallel.data_parallel.full_state_dict``.

    Writes ``config.json`` and ``model.safetensors`` atomically: a new directory is built
    beside ``path`` and renamed into place; an existing directory gets each file through a
    temporary file and ``os.replace`` (weights first, config last).
    """
    model = getattr(model, "module", model)  # DDP wrapper
    cfg: ModelConfig = model.cfg
    params = dict(model.named_parameters()) if state_dict is None else state_dict
    dtype = params["embed.weight"].dtype
    hf_config = config_to_hf(cfg, model_type, dtype, max_position_embeddings)

    tensors = {}
    for ours, theirs in _hf_names(cfg).items():
        tensors[theirs] = _plain(params[ours])
    if model_type == "qwen2" and not cfg.attention_bias:  # Qwen2 always has q/k/v biases
        for i in range(cfg.n_layers):
            for p in ("q", "k", "v"):
                w = tensors[f"model.layers.{i}.self_attn.{p}_proj.weight"]
                tensors[f"model.layers.{i}.self_attn.{p}_proj.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
    if model_type == "llama" and cfg.attention_bias:  # Llama's attention_bias also biases o_proj
        for i in range(cfg.n_layers):
            tensors[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(cfg.dim, dtype=dtype)

    def write_weights(file):
        save_file(tensors, file, metadata={"format": "pt"})

    def write_config(file):
        with open(file, "w") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
            f.write("\n")

    path = os.fspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"save_hf_checkpoint: {path!r} exists and is not a directory")
        if os.path.exists(os.path.join(path, _INDEX)):
            raise ValueError(
                f"save_hf_checkpoint: {path!r} already holds a sharded checkpoint "
                f"({_INDEX}); choose an empty or new directory"
            )
        _write_file(path, _WEIGHTS, write_weights)
        _write_file(path, _CONFIG, write_config)
        return
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        _write_file(tmp, _WEIGHTS, write_weights)
        _write_file(tmp, _CONFIG, write_config)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
