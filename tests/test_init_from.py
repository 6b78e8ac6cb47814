"""``init_from=`` a Hugging Face directory builds the checkpoint's own model (trainer/init_from.py):
every architecture field of its config.json (RoPE theta, norm eps, Qwen2's q/k/v biases, ...),
explicit settings on top and named; evaluation of the same directory builds the same model."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from models.hf_io import save_hf_checkpoint  # noqa: E402
from tests.test_hf_io import _hf_config, _hf_logits, _hf_model, _inputs, _our_logits  # noqa: E402
from trainer import stages  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.evaluate import load_for_eval  # noqa: E402
from trainer.train import build_model  # noqa: E402

TOL = 1e-5
CASES = {
    "llama_theta_eps": ("llama", dict(rope_theta=5e5, rms_norm_eps=1e-6)),
    "qwen2_biases": ("qwen2", dict(rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)),
}


def _checkpoint(case, path):
    model_type, extra = CASES[case]
    hf = _hf_model(_hf_config(model_type, **extra))
    hf.save_pretrained(path)
    return hf


def _cfg(path, **model) -> TrainConfig:
    cfg = TrainConfig(init_from=str(path))
    cfg.trainer.device = "cpu"
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("shapes", ["defaults", "matching"])
def test_trainer_builds_the_checkpoints_model(case, shapes, tmp_path, capsys):
    hf = _checkpoint(case, tmp_path / "hf")
    # "matching": the shapes given by hand, as a user had to before (the fields beyond shapes,
    # theta, eps and biases, were then silently longctx's defaults)
    given = dict(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)
    given = given if shapes == "matching" else {}
    cfg = stages.plan(_cfg(tmp_path / "hf", **given))[0].cfg
    model = build_model(cfg, torch.device("cpu"))
    ids, pos = _inputs()
    want = _hf_logits(hf, ids, pos)
    assert (_our_logits(model, ids, pos) - want).abs().max().item() <= TOL
    assert "the model of its config.json" in capsys.readouterr().out
    theta, eps = hf.config.rope_parameters["rope_theta"], hf.config.rms_norm_eps
    assert cfg.model.rope.theta == theta and cfg.model.norm_eps == eps  # what checkpoints record
    out = tmp_path / "export"
    save_hf_checkpoint(model, out, model_type=CASES[case][0])
    written = json.load(open(out / "config.json"))
    assert written["rope_theta"] == theta and written["rms_norm_eps"] == eps
    assert (_hf_logits(transformers.AutoModelForCausalLM.from_pretrained(out), ids, pos) - want).abs().max() <= TOL
    # trainer.evaluate on the same directory builds the same model
    ecfg, emodel = load_for_eval(str(tmp_path / "hf"), [])
    assert ecfg.model == cfg.model
    assert (_our_logits(emodel, ids, pos) - want).abs().max().item() <= TOL


def test_build_model_without_plan_resolves_too(tmp_path):
    hf = _checkpoint("qwen2_biases", tmp_path / "hf")
    model = build_model(_cfg(tmp_path / "hf"), torch.device("cpu"))
    ids, pos = _inputs()
    assert (_our_logits(model, ids, pos) - _hf_logits(hf, ids, pos)).abs().max().item() <= TOL


def test_explicit_settings_win_and_are_named(tmp_path, capsys):
    _checkpoint("llama_theta_eps", tmp_path / "hf")
    # norm_eps set to the schema default on the command line still counts; rope.factor differs
    cfg = _cfg(tmp_path / "hf", norm_eps=1e-5)
    cfg.model.rope.type, cfg.model.rope.factor = "linear", 2.0
    from trainer.init_from import resolve

    out = resolve(cfg, named={"norm_eps"})
    log = capsys.readouterr().out
    assert out.model.norm_eps == 1e-5 and out.model.rope.theta == 5e5  # theta from the checkpoint
    assert out.model.rope.type == "linear" and out.model.rope.factor == 2.0
    assert "model.norm_eps=1e-05" in log and "model.rope.type=linear" in log and "rope.theta" not in log.split(";")[-1]
    # without naming it, an eps equal to the default is the checkpoint's
    assert resolve(_cfg(tmp_path / "hf"), named=set()).model.norm_eps == 1e-6


def test_an_explicit_shape_that_differs_is_one_line(tmp_path):
    _checkpoint("qwen2_biases", tmp_path / "hf")
    with pytest.raises(ValueError, match=r"model.dim=32 differs from the checkpoint's 64.*remove model.dim") as e:
        stages.plan(_cfg(tmp_path / "hf", dim=32))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="model.attention_bias=False differs"):
        from trainer.init_from import resolve

        resolve(_cfg(tmp_path / "hf"), named={"attention_bias"})


def test_every_stage_builds_on_the_checkpoints_model(tmp_path):
    from trainer.config import StageConfig

    _checkpoint("llama_theta_eps", tmp_path / "hf")
    cfg = _cfg(tmp_path / "hf")
    rope = {"type": "yarn", "factor": 2.0, "original_max_position": 64}
    cfg.recipe.stages = [StageConfig(name="extend", steps=1, overrides={"model": {"rope": rope}})]
    model = stages.plan(cfg)[0].cfg.model
    assert (model.rope.type, model.rope.theta, model.norm_eps, model.ffn_dim) == ("yarn", 5e5, 1e-6, 96)
