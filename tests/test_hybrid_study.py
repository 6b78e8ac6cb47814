"""The hybrid-ratio study's reading of a multirun (trainer/hybrid_study.py) on synthetic job dirs."""

import json
import math
import os

import pytest

from trainer.hybrid_study import collect, pattern_point, plot


def test_pattern_point_is_mixer_and_ratio():
    assert pattern_point(["gla", "softmax"], 8) == ("gla", 1.0)
    assert pattern_point(["liger", "liger", "liger", "softmax"], 8) == ("liger", 3.0)
    assert pattern_point(["lolcats"], 8) == ("lolcats", math.inf)
    with pytest.raises(ValueError, match="exactly one mixer beside softmax"):
        pattern_point(["gla", "liger", "softmax"], 6)


def _job(root, num, pattern, val_loss, mqar):
    os.makedirs(os.path.join(root, str(num), ".hydra"))
    with open(os.path.join(root, str(num), ".hydra", "config.yaml"), "w") as f:
        f.write(f"model:\n  n_layers: 8\n  mixer_pattern: [{', '.join(pattern)}]\n")
    with open(os.path.join(root, str(num), "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 0, "val_loss": 9.0, "mqar@128": 0.0}) + "\n")
        f.write(json.dumps({"step": 5, "loss": 3.0}) + "\n")
        f.write(json.dumps({"step": 10, "val_loss": val_loss, "mqar@128": mqar}) + "\n")


def test_collect_takes_each_jobs_final_evaluation_and_plots(tmp_path):
    _job(tmp_path, 0, ["gla", "softmax"], 2.5, 0.5)
    _job(tmp_path, 1, ["gla"], 2.7, 0.1)
    _job(tmp_path, 2, ["liger", "softmax"], 2.4, 0.6)
    os.makedirs(tmp_path / "3" / ".hydra")  # an unfinished job: no metrics yet
    (tmp_path / "3" / ".hydra" / "config.yaml").write_text("model:\n  n_layers: 8\n  mixer_pattern: [gla]\n")
    rows = {(r["mixer"], r["ratio"]): r for r in collect(str(tmp_path))}
    assert set(rows) == {("gla", 1.0), ("gla", math.inf), ("liger", 1.0)}
    assert rows[("gla", 1.0)]["val_loss"] == 2.5 and rows[("gla", 1.0)]["mqar"] == {128: 0.5}
    pytest.importorskip("matplotlib")
    assert os.path.getsize(plot(list(rows.values()), str(tmp_path / "s.png"))) > 0
