"""A user's first hour: a typo in a config group, a binary data file, a run dir that is a file or
read-only, ``trainer.engine=NAME``, a resume with changed settings each stop with one line naming
the fix (or, for harmless changes, say what changed); a restarted run never duplicates its
metrics; Hydra's output dir is the run dir, train.log holds what the run printed, and a closing
line says where everything is."""

import json
import os
import subprocess
import sys

import pytest

from trainer.config import conf_dir
from trainer.data.sources import TextFilesSource
from trainer.metrics import MetricsLogger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "model.dim=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "data.seq_len=32",
    "trainer.log_every=1",
    "trainer.eval_batches=1",
    "trainer.progress_bar=false",
    "trainer.device=cpu",
    "logger.wandb=false",
]


def _main(args, cwd, timeout=120):
    """``python -m trainer.train ARGS`` as a user runs it (one process, no launcher)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HYDRA_FULL_ERROR"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", "trainer.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- item 2: config group typos ----------------------------------------------------------------
TYPOS = [
    ("experiment=quickstrat", "did you mean quickstart"),
    ("recipe=extnd", "did you mean extend"),
    ("model=tnyi", "did you mean tiny"),
    ("data=stdlb", "did you mean stdlib"),
    ("parallel=cp3", "did you mean cp2"),
    ("engine=deepspeeed", "did you mean deepspeed"),
    ("optim=adam", "did you mean adamw"),
    ("trainer=defualt", "did you mean default"),
    ("logger=defalt", "did you mean default"),
    ("+experiment=quickstrat", "did you mean quickstart"),
    ("experiment=nothing_like_it", "experiment has hybrid_sweep, quickstart, s2_quickstart"),
]


@pytest.mark.parametrize("override,hint", TYPOS)
def test_unknown_group_option_names_close_matches(override, hint):
    from trainer.run_checks import check_group_choices

    with pytest.raises(ValueError, match=hint) as e:
        check_group_choices([override], conf_dir())
    assert "\n" not in str(e.value) and override.lstrip("+") in str(e.value)


def test_known_group_options_and_other_overrides_pass():
    from trainer.run_checks import check_group_choices

    ok = ["experiment=quickstart", "recipe=extend", "engine=zero3", "experiment=null", "model.dim=64"]
    check_group_choices(ok + ["trainer.engine.name=deepspeed", "hydra.run.dir=x", "--multirun"], conf_dir())


@pytest.mark.parametrize("override", ["experiment=quickstrat", "recipe=extnd"])
def test_typo_on_the_command_line_stops_before_training(override, tmp_path):
    """Before: Hydra skipped the unknown option of an optional default and trained the default."""
    proc = _main([override, "trainer.steps=1", f"trainer.run_dir={tmp_path / 'run'}", *TINY], cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "did you mean" in lines[0], proc.stderr
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "outputs")


# -- item 9: trainer.engine=NAME, run dir a file or read-only ------------------------------------
def test_trainer_engine_name_points_at_the_group(tmp_path):
    proc = _main(["trainer.engine=deepspeed", *TINY], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "[longctx] error: trainer.engine=deepspeed sets a whole settings node: choose the engine with the group "
        "engine=deepspeed (or trainer.engine.name=deepspeed)"
    ]


def test_run_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    proc = _main([f"trainer.run_dir={tmp_path / 'notes.txt'}", *TINY], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"[longctx] error: trainer.run_dir={tmp_path / 'notes.txt'} is a file, not a directory: give a directory "
        "(a new one starts a run, an existing run dir resumes)"
    ]


def test_run_dir_checks(tmp_path, monkeypatch):
    from trainer.run_checks import check_run_dir

    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="lies under .*f, which is a file"):
        check_run_dir(str(tmp_path / "f" / "run"))
    check_run_dir(str(tmp_path / "new" / "run"))  # created later
    # read-only (chmod does not stop root, so the permission answer is what is replaced)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    with pytest.raises(ValueError, match="is not writable: fix its permissions or choose a writable trainer.run_dir"):
        check_run_dir(str(tmp_path))
    with pytest.raises(ValueError, match=f"would be created in {tmp_path}, which is not writable"):
        check_run_dir(str(tmp_path / "run"))


def test_hydra_dir_follows_the_run_dir():
    from trainer.run_checks import hydra_dir_overrides

    assert hydra_dir_overrides(["trainer.run_dir=runs/a", "x=1"]) == ["hydra.run.dir=runs/a"]
    assert hydra_dir_overrides(["trainer.run_dir=runs/a", "hydra.run.dir=elsewhere"]) == []
    assert hydra_dir_overrides(["trainer.run_dir=null"]) == hydra_dir_overrides([]) == []


def test_resume_config_changes():
    from trainer.run_checks import check_resume_config

    saved = {"model": {"dim": 64, "rope": {"theta": 1e4}}, "optim": {"lr": 3e-3}, "trainer": {"stop_after": 2}}
    same = json.loads(json.dumps(saved))
    assert check_resume_config(saved, same, 4) == []
    lr = {**same, "optim": {"lr": 1e-3}, "trainer": {"stop_after": None}}
    assert check_resume_config(saved, lr, 4) == [
        "resuming step 4 with settings that differ from the checkpoint's: optim.lr=0.001 (checkpoint: 0.003)"
    ]
    arch = {**same, "model": {"dim": 128, "rope": {"theta": 5e5}}}
    with pytest.raises(ValueError, match=r"model.dim=128 \(checkpoint: 64\), model.rope.theta=500000.0"):
        check_resume_config(saved, arch, 4)
    assert check_resume_config(None, arch, 4) == []  # a checkpoint without its settings


# -- item 3: binary files in data.paths ------------------------------------------------------------
def _binaries(tmp_path):
    rnd = tmp_path / "random.txt"
    rnd.write_bytes(os.urandom(20000))
    lib = tmp_path / "libfoo.txt"  # a shared library (this interpreter's executable will do)
    lib.write_bytes(open(sys.executable, "rb").read(200000))
    high = tmp_path / "noise.txt"  # no NUL byte, but nothing like UTF-8
    high.write_bytes(bytes(range(128, 256)) * 100)
    return [rnd, lib, high]


def test_binary_data_files_are_refused(tmp_path):
    for path in _binaries(tmp_path):
        with pytest.raises(ValueError, match=f"data.paths: {path} is not a text file .*point data.paths at"):
            TextFilesSource([str(path)])
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("plain text " * 100)
    (d / "b.jsonl").write_bytes(b'{"text": "ok"}\n' + b"\x00\x01" * 100)
    with pytest.raises(ValueError, match="b.jsonl is not a text file .*NUL bytes"):
        TextFilesSource([str(d)])


def test_text_with_a_few_odd_bytes_is_read(tmp_path):
    latin = tmp_path / "latin.txt"  # one latin-1 byte in 200: read, with a replacement character
    latin.write_bytes(b"caf\xe9 " + b"x" * 200)
    assert TextFilesSource([str(latin)])[0].startswith("caf\ufffd ")
    fffd = tmp_path / "fffd.txt"  # U+FFFD written in the file is text
    fffd.write_text("\ufffd" * 50 + "ok", encoding="utf-8")
    assert TextFilesSource([str(fffd)])[0] == "\ufffd" * 50 + "ok"


def test_binary_past_the_checked_head_is_refused_when_read(tmp_path):
    from trainer.data.sources import SAMPLE_BYTES

    path = tmp_path / "tail.txt"
    path.write_bytes(b"a" * (SAMPLE_BYTES + 10) + b"\x00" * 100)
    src = TextFilesSource([str(path)])
    with pytest.raises(ValueError, match="tail.txt is not a text file"):
        src[0]


# -- item 8: metrics of a run that died before its first checkpoint ------------------------------
class _NoWandb:
    wandb = False
    wandb_mode = "disabled"


def test_fresh_start_supersedes_a_dead_runs_rows(tmp_path):
    dead = MetricsLogger(str(tmp_path), {}, True, _NoWandb())
    for step in range(4):
        dead.log(step, {"loss": 1.0}, console=lambda s: None)
    again = MetricsLogger(str(tmp_path), {}, True, _NoWandb())  # no checkpoint: from scratch
    for step in range(3):
        again.log(step, {"loss": 2.0}, console=lambda s: None)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows[0] == {"step": 0, "resumed_from": 0, "superseded_rows": 4}
    assert [r["step"] for r in rows if "loss" in r] == [0, 1, 2]  # each step once
    assert len(open(tmp_path / "metrics.superseded.jsonl").read().splitlines()) == 4


def test_first_start_writes_no_marker(tmp_path):
    MetricsLogger(str(tmp_path), {}, True, _NoWandb()).log(1, {"loss": 1.0}, console=lambda s: None)
    assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] == [{"step": 1, "loss": 1.0}]


@pytest.mark.e2e
@pytest.mark.gloo
def test_rank_killed_before_the_first_checkpoint_leaves_one_curve(tmp_path):
    from tests.test_faults import _curve, _run

    run = str(tmp_path / "early")
    late = ["trainer.save_every=100"]  # no checkpoint before the crash
    with pytest.raises((AssertionError, TimeoutError)):
        _run(run, late, fault=("kill", 1, (4,)))  # rank 1 dies inside step 4
    assert not os.path.exists(os.path.join(run, "checkpoints")) or not os.listdir(os.path.join(run, "checkpoints"))
    assert [s for s, _ in _curve(run)][:3] == [1, 2, 3]
    _run(run, late)
    assert [s for s, _ in _curve(run)] == [1, 2, 3, 4, 5, 6]  # before: 1, 2, 3, 1, 2, ... 6


# -- items 7 and 9 end to end: run dir, train.log, closing line, resume checks --------------------
@pytest.mark.e2e
def test_run_dir_holds_hydra_record_log_and_resume_checks(tmp_path):
    run = tmp_path / "run"
    args = [f"trainer.run_dir={run}", "trainer.save_every=0", *TINY]
    first = _main(["trainer.steps=2", *args], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not os.path.exists(tmp_path / "outputs")  # Hydra's record is in the run dir
    assert os.path.isfile(run / ".hydra" / "config.yaml")
    log = open(run / "train.log").read()
    closing = first.stdout.strip().splitlines()[-1]
    assert closing.startswith("[longctx] done: step 2 (2 steps in ") and "final loss " in closing
    assert f"checkpoint {run}/checkpoints/step_000002, metrics {run}/metrics.jsonl" in closing
    assert "step=2 loss=" in log and closing in log  # what the run printed

    dim = _main([*args, "trainer.steps=3", "model.dim=64"], cwd=tmp_path)
    assert dim.returncode == 2
    assert dim.stderr.strip().splitlines() == [
        "[longctx] error: resuming step 2 with a different architecture: model.dim=64 (checkpoint: 32); "
        "restore those settings to resume, or choose a new trainer.run_dir (init_from=<this run dir> starts "
        "from its weights)"
    ]
    lr = _main([*args, "trainer.steps=3", "optim.lr=1e-3"], cwd=tmp_path)
    assert lr.returncode == 0, lr.stderr[-3000:]
    assert (
        "[longctx] resuming step 2 with settings that differ from the checkpoint's: optim.lr=0.001 "
        "(checkpoint: 0.003), trainer.steps=3 (checkpoint: 2)"
    ) in lr.stdout
    assert "[longctx] error" in open(run / "train.log").read()  # the refused resume is logged too
