"""Hugging Face import/export (models/hf_io.py) against transformers' own models.

Tiny random-weight models are built locally from configs (no downloads); logits of our
Transformer and of transformers' model on the same input must agree to 1e-5 (fp32).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from models.config import ModelConfig, RopeConfig  # noqa: E402
from models.hf_io import config_from_hf, load_hf_checkpoint, load_hf_model, save_hf_checkpoint  # noqa: E402
from models.llama import Transformer  # noqa: E402

TOL = 1e-5
B, T, VOCAB = 2, 32, 300


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Weights large enough that every tensor visibly shapes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    pos = torch.arange(T).expand(B, T)
    return ids, pos


def _hf_config(model_type: str, **extra):
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}[
        model_type
    ]
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    if model_type == "mistral":
        kw["sliding_window"] = None
    kw.update(extra)
    return cls(**kw)


def _hf_model(config, seed: int = 0):
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    _randomize(model, seed)
    return model.eval()


def _hf_logits(model, ids, pos):
    with torch.no_grad():
        return model(input_ids=ids, position_ids=pos).logits


def _our_logits(model, ids, pos):
    with torch.no_grad():
        return model.eval()(ids, pos)


IMPORT_CASES = {
    "llama": ("llama", {}),
    "llama_tied_4layers": ("llama", dict(tie_word_embeddings=True, num_hidden_layers=4)),
    "qwen2": ("qwen2", {}),
    # a window smaller than the sequence, on every layer (max_window_layers=0)
    "qwen2_window": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=0)),
    "mistral_window": ("mistral", dict(sliding_window=8)),
    "mistral_head_dim": ("mistral", dict(head_dim=32)),
    "llama_linear": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0})),
    "llama_yarn": (
        "llama",
        dict(
            max_position_embeddings=64,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 4.0,
                "rope_theta": 1000.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "llama_yarn_attn_factor": (
        "llama",
        dict(
            rope_parameters={
                "rope_type": "yarn",
                "factor": 8.0,
                "rope_theta": 10000.0,
                "attention_factor": 1.3,
                "beta_fast": 16.0,
                "beta_slow": 2.0,
                "original_max_position_embeddings": 16,
            }
        ),
    ),
    "llama_llama3": (
        "llama",
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "rope_theta": 10000.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(IMPORT_CASES))
def test_import_matches_transformers(case, tmp_path):
    model_type, extra = IMPORT_CASES[case]
    hf = _hf_model(_hf_config(model_type, **extra))
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    ours = load_hf_model(str(tmp_path))
    ids, pos = _inputs()
    want = _hf_logits(hf, ids, pos)
    got = _our_logits(ours, ids, pos)
    assert (got - want).abs().max().item() <= TOL, case
    cfg = ours.cfg
    if "window" in case:
        assert cfg.sliding_window == 8
        # the window really matters at T=32: full attention gives different logits
        full = load_hf_model(str(tmp_path), sliding_window=None)
        assert (_our_logits(full, ids, pos) - want).abs().max().item() > 1e-3
    if "rope_parameters" in extra:
        assert cfg.rope.type == extra["rope_parameters"]["rope_type"]


def test_sharded_checkpoint(tmp_path):
    hf = _hf_model(_hf_config("llama"))
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model.safetensors").exists()
    ours = load_hf_model(str(tmp_path))
    ids, pos = _inputs()
    assert (_our_logits(ours, ids, pos) - _hf_logits(hf, ids, pos)).abs().max().item() <= TOL


def _our_model(seed: int = 0, **kw) -> Transformer:
    base = dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, norm_eps=1e-6)
    base.update(kw)
    model = Transformer(ModelConfig(**base))
    _randomize(model, seed)
    return model.eval()


EXPORT_CASES = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", dict(tie_embeddings=True)),
    "llama_ntk": ("llama", dict(rope=RopeConfig(type="ntk", factor=4.0))),
    "llama_yarn": ("llama", dict(rope=RopeConfig(type="yarn", factor=4.0, original_max_position=16))),
    "llama_llama3": ("llama", dict(rope=RopeConfig(type="llama3", factor=8.0, original_max_position=32))),
    "llama_linear_bias": ("llama", dict(attention_bias=True, rope=RopeConfig(type="linear", factor=2.0, theta=500.0))),
    "qwen2_bias_window_tied": ("qwen2", dict(attention_bias=True, sliding_window=8, tie_embeddings=True)),
    "qwen2_no_bias": ("qwen2", {}),
    "mistral_window": ("mistral", dict(sliding_window=8, head_dim=32)),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_round_trip(case, tmp_path):
    model_type, kw = EXPORT_CASES[case]
    ours = _our_model(**kw)
    out = tmp_path / "export"
    save_hf_checkpoint(ours, str(out), model_type=model_type)
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temp dir left behind
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), attn_implementation="eager", dtype=torch.float32
    ).eval()
    assert type(hf).__name__ == json.loads((out / "config.json").read_text())["architectures"][0]
    ids, pos = _inputs(2)
    want = _our_logits(ours, ids, pos)
    assert (_hf_logits(hf, ids, pos) - want).abs().max().item() <= TOL, case
    # and back: identical parameters (ntk comes back as a plain, changed theta)
    back = load_hf_model(str(out))
    assert back.cfg.tie_embeddings == ours.cfg.tie_embeddings
    assert back.cfg.sliding_window == ours.cfg.sliding_window
    sd, sd_back = ours.state_dict(), back.state_dict()
    extra = set(sd_back) - set(sd)  # qwen2 always has q/k/v biases: exported as zeros
    assert set(sd) <= set(sd_back) and all(k.endswith("_proj.bias") for k in extra)
    assert all(torch.count_nonzero(sd_back[k]) == 0 for k in extra)
    assert all(torch.equal(sd[k], sd_back[k]) for k in sd)
    assert (_our_logits(back, ids, pos) - want).abs().max().item() <= TOL


def test_export_overwrites_existing_dir(tmp_path):
    save_hf_checkpoint(_our_model(seed=0), str(tmp_path), model_type="llama")
    second = _our_model(seed=1)
    save_hf_checkpoint(second, str(tmp_path), model_type="llama")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    _, state = load_hf_checkpoint(str(tmp_path))
    assert torch.equal(state["embed.weight"], second.embed.weight.detach())


def test_export_rejects_unrepresentable(tmp_path):
    with pytest.raises(ValueError, match="sliding_window"):
        save_hf_checkpoint(_our_model(sliding_window=8), str(tmp_path / "a"), model_type="llama")
    with pytest.raises(ValueError, match="model_type"):
        save_hf_checkpoint(_our_model(), str(tmp_path / "b"), model_type="gpt2")
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------ config parsing


def _llama_dict(**kw):
    d = dict(
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
    )
    d.update(kw)
    return d


def test_old_and_new_rope_formats_agree():
    old = config_from_hf(
        _llama_dict(
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        )
    )
    new = config_from_hf(
        _llama_dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
        )
    )
    assert old.rope == new.rope
    assert old.rope == RopeConfig(
        theta=500000.0, type="llama3", factor=8.0, original_max_position=8192, low_freq_factor=1.0, high_freq_factor=4.0
    )
    # very old spelling: "type" instead of "rope_type"
    lin = config_from_hf(_llama_dict(rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0}))
    assert (lin.rope.type, lin.rope.factor) == ("linear", 2.0)
    plain = config_from_hf(_llama_dict(rope_theta=1e6, rope_scaling=None))
    assert (plain.rope.type, plain.rope.theta) == ("none", 1e6)


def test_sliding_window_rules():
    qwen = dict(_llama_dict(), model_type="qwen2", sliding_window=8)
    assert config_from_hf(qwen).sliding_window is None  # use_sliding_window off
    assert config_from_hf(qwen).attention_bias is True
    assert config_from_hf(dict(qwen, use_sliding_window=True, max_window_layers=0)).sliding_window == 8
    assert config_from_hf(dict(qwen, use_sliding_window=True, max_window_layers=2)).sliding_window is None
    with pytest.raises(ValueError, match="mixes sliding-window and full-attention"):
        config_from_hf(dict(qwen, use_sliding_window=True, max_window_layers=1))
    assert config_from_hf(dict(_llama_dict(), model_type="mistral", sliding_window=8)).sliding_window == 8


# ------------------------------------------------------------------ bad input


def test_missing_directory(tmp_path):
    path = str(tmp_path / "nope")
    for fn in (load_hf_checkpoint, load_hf_model):
        with pytest.raises(ValueError, match="Hugging Face checkpoint") as e:
            fn(path)
        assert path in str(e.value) and "does not exist" in str(e.value)


def test_missing_files(tmp_path):
    with pytest.raises(ValueError, match="config.json is missing"):
        load_hf_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(_llama_dict()))
    with pytest.raises(ValueError, match="model.safetensors") as e:
        load_hf_checkpoint(str(tmp_path))
    assert str(tmp_path) in str(e.value) and "config.json" in str(e.value)


def test_unsupported_model_type():
    with pytest.raises(ValueError, match="model_type='gpt2'.*llama, qwen2, mistral"):
        config_from_hf(dict(_llama_dict(), model_type="gpt2"))


def test_dynamic_rope_rejected():
    with pytest.raises(ValueError, match="dynamic.*rope.type=ntk"):
        config_from_hf(_llama_dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(ValueError, match="longrope"):
        config_from_hf(_llama_dict(rope_parameters={"rope_type": "longrope", "factor": 2.0}))


def test_strict_tensor_names(tmp_path):
    from safetensors.torch import load_file, save_file

    save_hf_checkpoint(_our_model(), str(tmp_path), model_type="llama")
    file = str(tmp_path / "model.safetensors")
    tensors = load_file(file)
    extra = dict(tensors, **{"model.layers.0.mlp.extra.weight": torch.zeros(2)})
    save_file(extra, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected tensors.*mlp.extra"):
        load_hf_checkpoint(str(tmp_path))
    del tensors["model.norm.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing tensors.*model.norm.weight"):
        load_hf_checkpoint(str(tmp_path))
