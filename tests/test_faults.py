"""Fault injection on real gloo ranks: a rank killed mid-step, damaged checkpoints, NaN, disk
full. Each fault ends in an exact resume from the newest complete checkpoint or a one-line error;
nothing is lost, duplicated or silently restarted.

One reference run (2 ranks, 6 steps, checkpoints at steps 2, 4 and 6) serves every test.
"""

import errno
import functools
import json
import math
import os
import shutil

import pytest
from hydra import compose, initialize_config_dir

from parallel.spawn import run_distributed
from tests.test_train_e2e import CONF, TINY

pytestmark = [pytest.mark.e2e, pytest.mark.gloo]

COMMON = TINY + [
    "parallel=cp2",
    "trainer.steps=6",
    "optim.warmup_steps=2",
    "trainer.save_every=2",
    "trainer.keep_checkpoints=3",
]


def _train(rank, world, overrides, fault=None):
    """fault: (kind, rank, at): "kill" / "nan" at step(s) ``at``, "enospc" at the at-th save."""
    import trainer.train as tt

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = tt.to_config(compose(config_name="train", overrides=COMMON + overrides))
    if fault is not None and fault[1] == rank:
        kind, _, at = fault
        calls = [0]
        if kind in ("kill", "nan"):
            import trainer.objectives.next_token as next_token  # where the trainer's loss is taken

            real = next_token.batch_loss

            def batch_loss(ce, labels, mesh):
                calls[0] += 1
                if calls[0] in at and kind == "kill":
                    os._exit(1)  # dies mid-step, before backward
                loss, ce_sum, count = real(ce, labels, mesh)
                return (loss * math.nan, math.nan, count) if calls[0] in at else (loss, ce_sum, count)

            next_token.batch_loss = batch_loss
        else:  # the per-rank state file's write
            import trainer.checkpoint as ck

            real_write = ck.write_atomic

            def write_file(path, write):
                calls[0] += 1
                if calls[0] == at:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real_write(path, write)

            ck.write_atomic = write_file
    out = tt.train(cfg)
    return {"step": out["step"], "history": out["history"]}


def _run(run_dir, extra=(), fault=None, world=2):
    return run_distributed(_train, world, [f"trainer.run_dir={run_dir}", *extra], fault, timeout=90)


@functools.cache
def _reference(tmp):
    run = os.path.join(tmp, "reference")
    return run, _run(run)[0]["history"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _reference(str(tmp_path_factory.mktemp("faults")))


def _copy(reference, tmp_path, name):
    dst = str(tmp_path / name)
    shutil.copytree(reference[0], dst)
    return dst


def _curve(run_dir):
    """(step, loss) of the training rows of metrics.jsonl."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_killed_rank_resumes_without_lost_or_repeated_steps(reference, tmp_path):
    run = str(tmp_path / "kill")
    with pytest.raises((AssertionError, TimeoutError)):
        _run(run, fault=("kill", 1, (5,)))  # rank 1 dies inside step 5
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["latest", "step_000002", "step_000004"]
    out = _run(run)
    assert out[0]["step"] == 6 and out[0]["history"] == reference[1][4:]
    assert _curve(run) == list(zip(range(1, 7), reference[1]))  # one curve, every step once
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert {"step": 4, "resumed_from": 4, "superseded_rows": 0} in rows


DAMAGE = {  # what is done to the newest checkpoint (step 6) -> the reason resume gives
    "metadata missing": (".metadata", "remove", ".metadata is missing"),
    "distcp truncated": ("__0_0.distcp", "truncate", "__0_0.distcp has"),
    "distcp flipped": ("__1_0.distcp", "flip", "__1_0.distcp fails its checksum"),
    "rank state missing": ("rank_00001.pt", "remove", "rank_00001.pt is missing"),
    "manifest missing": ("manifest.json", "remove", "manifest.json is missing or unreadable"),
}


def _damage(ckpt, name, how):
    path = os.path.join(ckpt, name)
    if how == "remove":
        os.remove(path)
    else:
        data = bytearray(open(path, "rb").read())
        if how == "truncate":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 2] ^= 0xFF
        open(path, "wb").write(bytes(data))


def _find(rank, world, run_dirs):
    from trainer.checkpoint import find_resume

    out = []
    for d in run_dirs:
        try:
            out.append(find_resume(d, rank, world))
        except ValueError as e:
            out.append(str(e))
    return out


def test_damaged_checkpoints_are_skipped_with_a_reason(reference, tmp_path):
    dirs = []
    for i, (name, how, _) in enumerate(DAMAGE.values()):
        dirs.append(_copy(reference, tmp_path, f"d{i}"))
        _damage(os.path.join(dirs[-1], "checkpoints", "step_000006"), name, how)
    empty_latest = _copy(reference, tmp_path, "latest")
    open(os.path.join(empty_latest, "checkpoints", "latest"), "w").close()
    missing_dir = _copy(reference, tmp_path, "gone")
    shutil.rmtree(os.path.join(missing_dir, "checkpoints", "step_000006"))
    all_bad = _copy(reference, tmp_path, "all_bad")
    for step in (2, 4, 6):
        os.remove(os.path.join(all_bad, "checkpoints", f"step_{step:06d}", "manifest.json"))
    found = run_distributed(_find, 2, dirs + [empty_latest, missing_dir, all_bad], timeout=60)
    assert found[0] == found[1]
    for (step, skipped), (_, _, reason) in zip(found[0], DAMAGE.values()):
        assert step == 4 and len(skipped) == 1 and skipped[0].startswith("skipped step_000006: " + reason)
    assert found[0][5] == (6, []) and found[0][6] == (4, [])  # `latest` is not the truth
    assert found[0][7].startswith("no complete checkpoint in") and "move the directory away" in found[0][7]
    out = _run(dirs[1])  # training resumes from step 4 exactly
    assert out[0]["history"] == reference[1][4:]


def test_checkpoint_of_another_world_size_is_refused(reference):
    found = run_distributed(_find, 1, [reference[0]], timeout=60)[0][0]
    assert "was written by 2 ranks, this run has 1: resume with 2 ranks" in found


def test_nan_is_caught_at_its_step_and_no_nan_checkpoint_is_written(tmp_path):
    run = str(tmp_path / "nan")
    with pytest.raises(
        AssertionError,
        match=r"non-finite loss \([^)]*\) or grad norm \(nan\) at step 3; "
        r"stopped \(trainer.nonfinite=stop\) without updating, the last good checkpoint "
        r"is step_000002",
    ):
        _run(run, fault=("nan", 1, (3,)))
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["latest", "step_000002"]


def test_nan_skip_policy_counts_and_stops_after_max_skips(reference, tmp_path):
    run = str(tmp_path / "skip")
    with pytest.raises(
        AssertionError,
        match=r"at step 5; stopped \(more than trainer.max_skips=1 "
        r"non-finite steps\) without updating, the last good checkpoint is step_000004",
    ):
        _run(run, ["trainer.nonfinite=skip", "trainer.max_skips=1"], fault=("nan", 0, (3, 5)))
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert _curve(run)[:2] == list(zip((1, 2), reference[1][:2]))
    assert [(r["step"], r.get("skipped_steps")) for r in rows if "loss" in r] == [(1, None), (2, None), (3, 1), (4, 1)]
    assert math.isnan(rows[3]["loss"]) and math.isfinite(rows[4]["loss"])  # step 3 skipped, 4 trained


def test_disk_full_while_saving_keeps_the_previous_checkpoint(reference, tmp_path):
    run = str(tmp_path / "full")
    with pytest.raises(
        AssertionError,
        match=r"could not write the checkpoint of step 4 \(rank 1: "
        r"\[Errno 28\] No space left on device\): older checkpoints are intact",
    ):
        _run(run, fault=("enospc", 1, 2))  # rank 1's second save fails
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["latest", "step_000002"]
    out = _run(run)
    assert out[0]["history"] == reference[1][2:]
    assert _curve(run) == list(zip(range(1, 7), reference[1]))  # steps 3-4 logged once
    old = [json.loads(line)["step"] for line in open(os.path.join(run, "metrics.superseded.jsonl"))]
    assert old == [3, 4]
