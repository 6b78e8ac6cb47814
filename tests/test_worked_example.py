"""The README's worked example can not drift: its section is exactly what
``python -m trainer.worked_example`` renders from the stored results, and the script itself runs
(a few steps) and rewrites a README the same way."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from trainer.worked_example import readme_section, render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["pretrain", "extend", "transfer", "lora", "lolcats_transfer", "lolcats_lora", "liger_lora"]
STAGES += ["lizard_transfer", "lizard_lora"]
SHORT = [f"recipe.stages.{i}.steps=2" for i in range(len(STAGES))] + ["data.seq_len=128", "trainer.log_every=1"]
SHORT += [f"recipe.stages.{i}.overrides.data.seq_len=128" for i in range(1, len(STAGES))]
SHORT += ["trainer.passkey_lengths=[128]", "trainer.passkey_depths=[0.5]", "trainer.eval_batches=1"]
SHORT += ["trainer.mqar_lengths=[128]", "trainer.mqar_samples=1"]


def test_readme_section_is_rendered_from_the_stored_results():
    with open(os.path.join(ROOT, "docs", "worked_example", "results.json")) as f:
        results = json.load(f)
    assert readme_section(os.path.join(ROOT, "README.md")) == render(results)
    for png in ("loss_by_position.png", "passkey_heatmap.png", "accuracy_vs_length.png"):
        assert os.path.exists(os.path.join(ROOT, "docs", "worked_example", png))


def test_retrieval_section_is_rendered_from_the_stored_results():
    from trainer.worked_example import RETRIEVAL_BEGIN, RETRIEVAL_END, render_retrieval, retrieval_variants

    with open(os.path.join(ROOT, "docs", "retrieval", "results.json")) as f:
        results = json.load(f)
    readme = os.path.join(ROOT, "README.md")
    assert readme_section(readme, RETRIEVAL_BEGIN, RETRIEVAL_END) == render_retrieval(results, retrieval_variants(ROOT))
    assert [s["name"] for s in results["stages"]] == ["induction", "pretrain", "extend_2x", "extend_4x"]
    for png in ("accuracy_vs_length.png", "passkey_heatmap.png", "loss_by_position.png"):
        assert os.path.exists(os.path.join(ROOT, "docs", "retrieval", png))


def _plan(recipe: str) -> dict:
    from hydra import compose, initialize_config_dir

    from trainer import stages
    from trainer.config import conf_dir, register_schema
    from trainer.train import to_config

    register_schema()
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = to_config(compose(config_name="train", overrides=[f"recipe={recipe}"]))
    return {st.spec.name: st for st in stages.plan(cfg)}


@pytest.mark.parametrize("mixer", ["lolcats", "liger", "lizard"])
def test_the_linearization_rows_are_the_linearize_recipes(mixer):
    """Each two-kind branch of the worked example is ``recipe=linearize_<mixer>``'s stages (what
    trains, how, the mixers and the window), started from the extended model."""
    example, recipe = _plan("cpu_example"), _plan(f"linearize_{mixer}")
    for name, want in recipe.items():
        got = example[f"{mixer}_{name}"]
        for field in ("objective", "train_params", "lora_rank", "lora_alpha", "lora_targets", "optimizer"):
            assert getattr(got.spec, field) == getattr(want.spec, field), (name, field)
        for field in ("mixer_pattern", "hybrid_window"):
            assert getattr(got.cfg.model, field) == getattr(want.cfg.model, field), (name, field)
        assert (got.cfg.optim.lr, got.cfg.optim.weight_decay) == (want.cfg.optim.lr, want.cfg.optim.weight_decay)
    first = example[f"{mixer}_{next(iter(recipe))}"]
    assert first.spec.start_from == "extend" and first.cfg.model.rope == example["extend"].cfg.model.rope


@pytest.mark.e2e
def test_the_script_runs_the_recipe_and_rewrites_the_readme(tmp_path):
    pytest.importorskip("matplotlib")
    from trainer.worked_example import main

    readme = tmp_path / "README.md"
    shutil.copy(os.path.join(ROOT, "README.md"), readme)
    out = tmp_path / "out"
    main(["--run-dir", str(tmp_path / "run"), "--out", str(out), "--readme", str(readme), *SHORT])
    results = json.load(open(out / "results.json"))
    assert [s["name"] for s in results["stages"]] == STAGES
    assert readme_section(str(readme)) == render(results)
    text, by = render(results), {s["name"]: s for s in results["stages"]}
    assert "| transfer | 128, RoPE YaRN x2 | 3 linear : 1 softmax | 2 |" in text
    teacher = by["extend"]["loss_end"]
    for name, mixer in (("lolcats_lora", "lolcats"), ("liger_lora", "liger"), ("lizard_lora", "lizard")):
        s = by[name]  # each linearization: its gap to the teacher, passkey and MQAR after it
        assert s["mixers"] == {mixer: 4} and set(s["passkey_end"]) == set(s["mqar_end"]) == {"128"}
        row = next(line for line in text.splitlines() if line.startswith(f"| {name}"))
        tail = f" {s['loss_end'] - teacher:+.3f} | {s['passkey_end']['128']:.2g} | {s['mqar_end']['128']:.2g} |"
        assert row.endswith(tail)
    for name in ("lolcats_transfer", "liger_lora", "lizard_transfer"):  # branches of the teacher
        assert by[name]["start_from"] == "extend" and f"| {name} (from extend) |" in text
    assert (out / "passkey_heatmap.png").exists() and (out / "loss_by_position.png").exists()
    before = readme.read_text()  # outside the markers nothing changes
    original = open(os.path.join(ROOT, "README.md")).read()
    assert before.split("<!-- worked-example:")[0] == original.split("<!-- worked-example:")[0]
    assert before.split("<!-- worked-example: end -->")[1] == original.split("<!-- worked-example: end -->")[1]
