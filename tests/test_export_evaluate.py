"""A user's run dir afterwards: ``python -m trainer.evaluate RUN_DIR`` on one process whatever CP
the run used, ``longctx-export RUN_DIR OUT_DIR`` (native and DeepSpeed) reloading in transformers
with equal logits and the trained architecture, a stage that changes the model saying what it
carried, ``--plot`` without matplotlib naming the fix."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from parallel.spawn import run_distributed
from tests.test_train_e2e import CONF, TINY, _train

EVAL = ["trainer.passkey_lengths=[128]", "trainer.passkey_depths=[0.5]", "trainer.passkey_samples=1"]
EVAL += ["trainer.eval_position_buckets=2", "trainer.mqar_lengths=[]", "trainer.eval_batches=1"]


def _evaluate(rank, world, argv):
    from trainer.evaluate import main

    main(argv)
    return True


def _rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.mark.e2e
@pytest.mark.gloo
def test_cp2_run_dir_evaluates_on_one_process_and_extending_it_reports_the_change(tmp_path, capsys):
    run, out = str(tmp_path / "hybrid"), str(tmp_path / "report")
    hybrid = ["model.mixer_pattern=[simple_gla,softmax]", "trainer.steps=2"]
    run_distributed(_train, 2, ["parallel=cp2", f"trainer.run_dir={run}"] + hybrid + EVAL)
    run_distributed(_evaluate, 1, [run, "--out", out] + EVAL)
    summary = json.load(open(os.path.join(out, "hybrid.json")))
    trained = [r for r in _rows(run) if "val_loss" in r][-1]  # the run's own last evaluation (CP=2)
    assert abs(summary["val_loss"] - trained["val_loss"]) <= 1e-4 * trained["val_loss"]
    assert summary["passkey"]["lengths"] == [128]

    # recipe=extend from the hybrid run without a mixer pattern: warned, and the carry named
    from trainer import stages
    from trainer.train import build_model, to_config

    capsys.readouterr()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = to_config(compose(config_name="train", overrides=TINY + ["recipe=extend", f"init_from={run}"]))
    build_model(stages.plan(cfg)[0].cfg, torch.device("cpu"))
    log = capsys.readouterr().out
    assert "was trained with model.mixer_pattern=['simple_gla', 'softmax']" in log, log
    assert f"init_from={run}: copied" in log and "new " in log and "dropped " in log, log


def _hf_llama(path, theta=5e5, eps=1e-6):
    transformers = pytest.importorskip("transformers")
    from tests.test_hf_io import _hf_config, _hf_model

    hf = _hf_model(_hf_config("llama", rope_theta=theta, rms_norm_eps=eps, vocab_size=260, hidden_size=64))
    hf.save_pretrained(path)
    return transformers


def _reload_matches(run, out, transformers):
    """The export in ``out`` loads in transformers with the logits of the run's weights."""
    from models import Transformer
    from trainer.checkpoint import load_run_weights as run_weights
    from trainer.export import model_config

    meta, weights = run_weights(run)
    ours = Transformer(model_config(meta))
    ours.load_state_dict(weights)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(32).expand(2, 32)
    with torch.no_grad():
        diff = (ours.eval()(ids, pos) - theirs(input_ids=ids, position_ids=pos).logits).abs().max().item()
    assert diff <= 1e-5, diff
    return ours.cfg


@pytest.mark.e2e
@pytest.mark.gloo
def test_export_of_a_run_started_from_hugging_face_writes_what_was_trained(tmp_path):
    hf, run, out = str(tmp_path / "hf"), str(tmp_path / "run"), str(tmp_path / "export")
    transformers = _hf_llama(hf)
    run_distributed(_train, 1, [f"init_from={hf}", f"trainer.run_dir={run}", "trainer.steps=2"] + EVAL)
    from trainer.export import main

    main([run, out])
    written = json.load(open(os.path.join(out, "config.json")))
    assert written["rope_theta"] == 5e5 and written["rms_norm_eps"] == 1e-6 and written["intermediate_size"] == 96
    cfg = _reload_matches(run, out, transformers)
    from trainer.evaluate import load_for_eval

    assert load_for_eval(run, [])[0].model == cfg  # evaluate builds what was trained and exported


@pytest.mark.e2e
@pytest.mark.gloo
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_export_of_a_deepspeed_run(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    run, out = str(tmp_path / "ds"), str(tmp_path / "export")
    run_distributed(_train, 1, ["engine=zero3", f"trainer.run_dir={run}", "trainer.steps=2"] + EVAL)
    from trainer.export import main

    main([run, out, "--model-type", "mistral"])
    assert json.load(open(os.path.join(out, "config.json")))["model_type"] == "mistral"
    _reload_matches(run, out, transformers)
    run_distributed(_evaluate, 1, [run, "--out", str(tmp_path / "report")] + EVAL)  # its run dir evaluates too
    assert json.load(open(tmp_path / "report" / "ds.json"))["passkey"]["lengths"] == [128]


def test_export_without_a_checkpoint_is_one_line(tmp_path, capsys):
    from trainer.export import main

    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "holds no complete longctx checkpoint" in err and err.count("\n") == 1


def test_plot_without_matplotlib_names_the_fix(tmp_path, monkeypatch, capsys):
    from trainer.evaluate import main

    summary = tmp_path / "a.json"
    summary.write_text(json.dumps({"val_loss": 1.0, "loss_by_position": {"edges": [0, 8, 16], "loss": [2.0, 1.0]}}))
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit) as e:
        main(["--plot", str(summary), "--out", str(tmp_path / "plots")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "pip install -e '.[bench]'" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "plots")


def test_carry_report_folds_layer_indices(capsys):
    from models import ModelConfig, Transformer
    from trainer.stages import carry_weights

    src = Transformer(ModelConfig(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, mixer_pattern=["simple_gla", "softmax"]))
    dst = Transformer(ModelConfig(dim=32, n_layers=4, n_heads=4, n_kv_heads=2))
    counts = carry_weights({k: v.detach() for k, v in src.named_parameters()}, dst, where="stage 2")
    log = capsys.readouterr().out
    assert log.startswith("[longctx] stage 2: copied ") and log.count("\n") == 1
    assert f"new {counts['new']}" in log and f"dropped {counts['dropped']}" in log and counts["dropped"] > 0
    assert "layers.{0,2}." in log  # the two simple_gla layers folded into one name
