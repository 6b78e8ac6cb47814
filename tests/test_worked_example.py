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
SHORT = [f"recipe.stages.{i}.steps=2" for i in range(4)] + ["data.seq_len=128", "trainer.log_every=1"]
SHORT += [f"recipe.stages.{i}.overrides.data.seq_len=128" for i in (1, 2, 3)]
SHORT += ["trainer.passkey_lengths=[128]", "trainer.passkey_depths=[0.5]", "trainer.eval_batches=1"]


def test_readme_section_is_rendered_from_the_stored_results():
    with open(os.path.join(ROOT, "docs", "worked_example", "results.json")) as f:
        results = json.load(f)
    assert readme_section(os.path.join(ROOT, "README.md")) == render(results)
    for png in ("loss_by_position.png", "passkey_heatmap.png"):
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


@pytest.mark.e2e
def test_the_script_runs_the_recipe_and_rewrites_the_readme(tmp_path):
    pytest.importorskip("matplotlib")
    from trainer.worked_example import main

    readme = tmp_path / "README.md"
    shutil.copy(os.path.join(ROOT, "README.md"), readme)
    out = tmp_path / "out"
    main(["--run-dir", str(tmp_path / "run"), "--out", str(out), "--readme", str(readme), *SHORT])
    results = json.load(open(out / "results.json"))
    assert [s["name"] for s in results["stages"]] == ["pretrain", "extend", "transfer", "lora"]
    assert readme_section(str(readme)) == render(results)
    assert "| transfer | 128, RoPE YaRN x2 | 3 linear : 1 softmax | 2 |" in render(results)
    assert (out / "passkey_heatmap.png").exists() and (out / "loss_by_position.png").exists()
    before = readme.read_text()  # outside the markers nothing changes
    original = open(os.path.join(ROOT, "README.md")).read()
    assert before.split("<!-- worked-example:")[0] == original.split("<!-- worked-example:")[0]
    assert before.split("<!-- worked-example: end -->")[1] == original.split("<!-- worked-example: end -->")[1]
