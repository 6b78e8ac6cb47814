"""The hybrid-ratio study's reading of a multirun (trainer/hybrid_study.py) on synthetic job dirs."""

import json
import math
import os

import pytest

from trainer.hybrid_study import collect, pattern_point, plot, table


def test_pattern_point_is_mixer_and_ratio():
    assert pattern_point(["gla", "softmax"], 8) == ("gla", 1.0)
    assert pattern_point(["liger", "liger", "liger", "softmax"], 8) == ("liger", 3.0)
    assert pattern_point(["lolcats"], 8) == ("lolcats", math.inf)
    assert pattern_point(["softmax"], 8) == ("softmax", 0.0)  # the all-softmax reference
    with pytest.raises(ValueError, match="exactly one mixer beside softmax"):
        pattern_point(["gla", "liger", "softmax"], 6)


def _job(root, num, pattern, val_loss, mqar, copy=None, steps=10):
    os.makedirs(os.path.join(root, str(num), ".hydra"))
    with open(os.path.join(root, str(num), ".hydra", "config.yaml"), "w") as f:
        f.write(f"model:\n  n_layers: 8\n  mixer_pattern: [{', '.join(pattern)}]\ntrainer:\n  steps: {steps}\n")
    with open(os.path.join(root, str(num), "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 0, "val_loss": 9.0, "mqar@128": 0.0, "copy@8": 0.0}) + "\n")
        f.write(json.dumps({"step": 5, "loss": 3.0}) + "\n")
        final = {"step": 10, "val_loss": val_loss, "mqar@128": mqar, "copy_samples": 4}
        final.update({f"copy@{n}": v for n, v in (copy or {}).items()})
        f.write(json.dumps(final) + "\n")


def test_collect_takes_each_jobs_final_evaluation_and_plots(tmp_path):
    _job(tmp_path, 0, ["gla", "softmax"], 2.5, 0.5, {8: 0.75, 16: 0.25})
    _job(tmp_path, 1, ["gla"], 2.7, 0.1, {8: 0.125})
    _job(tmp_path, 2, ["liger", "softmax"], 2.4, 0.6)
    _job(tmp_path, 4, ["softmax"], 2.3, 0.7, {8: 1.0, 16: 0.5})
    _job(tmp_path, 5, ["lizard"], 2.2, 0.9, steps=20)  # still training: evaluated at 10 of 20 steps
    os.makedirs(tmp_path / "3" / ".hydra")  # an unfinished job: no metrics yet
    (tmp_path / "3" / ".hydra" / "config.yaml").write_text("model:\n  n_layers: 8\n  mixer_pattern: [gla]\n")
    rows = {(r["mixer"], r["ratio"]): r for r in collect(str(tmp_path))}
    assert set(rows) == {("gla", 1.0), ("gla", math.inf), ("liger", 1.0), ("softmax", 0.0)}
    assert rows[("gla", 1.0)]["val_loss"] == 2.5 and rows[("gla", 1.0)]["mqar"] == {128: 0.5}
    assert rows[("gla", 1.0)]["copy"] == {8: 0.75, 16: 0.25}  # copy@L only, not copy_samples
    assert rows[("gla", math.inf)]["copy"] == {8: 0.125} and rows[("liger", 1.0)]["copy"] == {}
    lines = table(list(rows.values())).splitlines()
    assert lines[0] == "| mixer | linear : softmax | held-out loss | copy@8 | copy@16 | mqar@128 |"
    assert lines[2] == "| softmax | all softmax | 2.300 | 1.000 | 0.500 | 0.700 |"  # the reference first
    assert lines[3] == "| gla | 1:1 | 2.500 | 0.750 | 0.250 | 0.500 |"
    assert lines[4] == "| gla | all linear | 2.700 | 0.125 | - | 0.100 |"
    assert lines[5] == "| liger | 1:1 | 2.400 | - | - | 0.600 |"
    pytest.importorskip("matplotlib")
    assert os.path.getsize(plot(list(rows.values()), str(tmp_path / "s.png"))) > 0
