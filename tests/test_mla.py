"""Multi-head latent attention (models/mla_attention.py): the kind's op against its reference,
Hugging Face DeepSeek-V3 / V2 import and export against transformers (fp32 logits), and planted
bugs (RoPE on the no-RoPE dims, the latent norm skipped) that the import check catches."""

from __future__ import annotations

import pytest
import torch

from models import ModelConfig, Transformer
from models.context import SingleDeviceContext
from models.kv_cache import kv_cache_bytes
from models.mla_attention import local_mla, local_mla_ref
from models.registry import options_of

TOL = 1e-5


def test_op_matches_reference_fp64():
    """Documents, windows, Dv != Dn + Dr both ways; forward and every gradient."""
    g = torch.Generator().manual_seed(0)
    for dqk, dv, window, causal in [(24, 20, 7, True), (12, 20, None, True), (16, 16, 5, False)]:
        b, t, h, dc, dr = 2, 40, 4, 10, 8
        q = torch.randn(b, t, h, dqk, dtype=torch.float64, generator=g)
        c = torch.randn(b, t, 1, dc, dtype=torch.float64, generator=g)
        kr = torch.randn(b, t, 1, dr, dtype=torch.float64, generator=g)
        w = torch.randn(h * (dqk - dr + dv), dc, dtype=torch.float64, generator=g)
        do = torch.randn(b, t, h, dv, dtype=torch.float64, generator=g)
        ctx = SingleDeviceContext(b, t, torch.tensor([0, 10, 40, 55, 80]), block=16)
        outs = []
        for op in (local_mla, local_mla_ref):
            xs = [x.clone().requires_grad_() for x in (q, c, kr, w)]
            o = op(*xs[:3], ctx, kv_b=xs[3], v_head_dim=dv, causal=causal, window=window, scale=0.3)
            (o * do).sum().backward()
            outs.append([o] + [x.grad for x in xs])
        assert max((a - r).abs().max().item() for a, r in zip(*outs)) < 1e-12


def test_options_checked():
    with pytest.raises(ValueError, match="model.mla_qk_rope_head_dim=6 must be even and at most"):
        ModelConfig(dim=64, n_heads=4, mixer_pattern=["mla"], head_dim=4, mla_qk_rope_head_dim=6)
    with pytest.raises(ValueError, match="model.mla_q_lora_rank=0"):
        ModelConfig(dim=64, n_heads=4, mixer_pattern=["mla"], mla_q_lora_rank=0)


def test_kv_cache_bytes():
    cfg = ModelConfig(
        dim=64, n_layers=3, n_heads=4, n_kv_heads=2, mixer_pattern=["mla", "softmax", "gla"], mla_kv_lora_rank=24
    )
    dc, _, dr, _ = options_of(cfg, "mla").dims(cfg)
    got = kv_cache_bytes(cfg, 2)
    assert got["kv_cache_bytes_per_token"] == (dc + dr) * 2 + 2 * 2 * 16 * 2
    assert got["state_bytes"] == 4 * 16 * 16 * 2  # gla: H * Dk * Dv


# --------------------------------------------------------------------------- Hugging Face

transformers = pytest.importorskip("transformers")

from models.hf_io import load_hf_model, save_hf_checkpoint  # noqa: E402
from tests.test_hf_io import _hf_logits, _inputs, _our_logits, _randomize  # noqa: E402

VOCAB = 300


def _deepseek(model_type="deepseek_v3", seed=0, **extra):
    cls = {"deepseek_v3": transformers.DeepseekV3Config, "deepseek_v2": transformers.DeepseekV2Config}[model_type]
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=12,
        qk_rope_head_dim=8,
        v_head_dim=10,
        first_k_dense_replace=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        rms_norm_eps=1e-6,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    kw.update(extra)
    config = cls(**kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    _randomize(model, seed)
    return model.eval()


def _rope_query_bug(q, cos, sin, dn):
    """Planted bug: RoPE on the first Dr dims (the no-RoPE part), the RoPE part left as is."""
    from models.rope import apply_rotary

    dr = cos.shape[-1]
    return torch.cat([apply_rotary(q[..., :dr], cos, sin), q[..., dr:]], dim=-1)


def _import_error(tmp_path, hf, bug=None, monkeypatch=None, positions=None) -> float:
    hf.save_pretrained(tmp_path)
    ours = load_hf_model(str(tmp_path))
    if bug == "rope_on_nope":
        monkeypatch.setattr("models.mla_attention.rotate_query", _rope_query_bug)
    if bug == "no_latent_norm":
        for block in ours.layers.values():
            block.mixer.kv_a_norm = torch.nn.Identity()
    ids, pos = _inputs()
    if positions is not None:
        pos = positions
    return (_our_logits(ours, ids, pos) - _hf_logits(hf, ids, pos)).abs().max().item()


YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "rope_theta": 10000.0,
    "original_max_position_embeddings": 16,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
}
CASES = {
    "v3_q_lora": ("deepseek_v3", {}),
    "v3_full_q": ("deepseek_v3", dict(q_lora_rank=None)),
    "v3_not_interleaved": ("deepseek_v3", dict(rope_interleave=False)),
    "v3_yarn_mscale": ("deepseek_v3", dict(rope_parameters=YARN, max_position_embeddings=64)),
    "v3_bias_tied": ("deepseek_v3", dict(attention_bias=True, tie_word_embeddings=True)),
    "v2": ("deepseek_v2", dict(first_k_dense_replace=2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_matches_transformers(case, tmp_path):
    model_type, extra = CASES[case]
    err = _import_error(tmp_path, _deepseek(model_type, **extra))
    assert err <= TOL, (case, err)


@pytest.mark.parametrize("bug", ["rope_on_nope", "no_latent_norm"])
def test_planted_bugs_fail_the_import_check(bug, tmp_path, monkeypatch):
    err = _import_error(tmp_path, _deepseek(), bug, monkeypatch)
    assert err > 1e-3, (bug, err)


def test_moe_layers_rejected(tmp_path):
    _deepseek(first_k_dense_replace=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="first_k_dense_replace=1 < num_hidden_layers=2"):
        load_hf_model(str(tmp_path))


@pytest.mark.parametrize("q_lora_rank", [None, 20])
def test_export_round_trip(q_lora_rank, tmp_path):
    cfg = ModelConfig(
        vocab_size=VOCAB,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=4,
        head_dim=8,
        ffn_dim=96,
        norm_eps=1e-6,
        mixer_pattern=["mla"],
        mla_q_lora_rank=q_lora_rank,
        mla_kv_lora_rank=16,
        mla_qk_nope_head_dim=12,
        mla_v_head_dim=10,
    )
    ours = Transformer(cfg)
    _randomize(ours, 3)
    save_hf_checkpoint(ours, str(tmp_path / "out"), model_type="deepseek_v3")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "out"), attn_implementation="eager", dtype=torch.float32
    ).eval()
    ids, pos = _inputs(2)
    assert (_our_logits(ours, ids, pos) - _hf_logits(hf, ids, pos)).abs().max().item() <= TOL
    back = load_hf_model(str(tmp_path / "out"))
    assert (_our_logits(back, ids, pos) - _our_logits(ours, ids, pos)).abs().max().item() == 0
