"""Engines (trainer/engines) on 2 gloo ranks with CP=2 and a hybrid model (LASP-2 + all-gather
KV): DeepSpeed ZeRO 0-3 and Accelerate follow the native engine's loss curve (fp32, 1e-5) and
resume bit-exactly from their own checkpoints; nothing is JIT-compiled; bad engine settings
stop with one line. One spawn per engine (every ZeRO stage in one)."""

import glob
import importlib.util
import os

import pytest
import torch

from parallel.spawn import run_distributed
from tests.test_train_e2e import _train

pytestmark = [pytest.mark.e2e, pytest.mark.gloo]

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (pip install -e '.[deepspeed]')"
)
needs_accelerate = pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None,
    reason="accelerate is not installed (pip install -e '.[accelerate]')",
)

COMMON = [
    "parallel=cp2",
    "model.mixer_pattern=[simple_gla,softmax]",
    "trainer.steps=4",
    "trainer.grad_accum=2",
    "optim.warmup_steps=2",
]


def _runs(rank, world, runs):
    """Several trainer runs in one spawn (the process group is reused)."""
    return [_train(rank, world, COMMON + overrides) for overrides in runs]


def _engine_runs(tmp_path, name, engine):
    """The runs for one engine setting: all steps, then the same split 2 + 2 with a resume."""
    a, b = tmp_path / f"{name}_full", tmp_path / f"{name}_split"
    return [
        engine + [f"trainer.run_dir={a}"],
        engine + [f"trainer.run_dir={b}", "trainer.stop_after=2"],
        engine + [f"trainer.run_dir={b}"],
    ]


def _tensors(obj, prefix=""):
    """Every tensor in a nested checkpoint object, by path."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out = {}
    for k, v in items:
        out.update(_tensors(v, f"{prefix}/{k}"))
    return out


def _assert_same_checkpoint(run_a, run_b, step):
    """Every tensor of every file the engine wrote (model, optimizer, ...) is bit-identical."""
    da, db = (os.path.join(r, "checkpoints", f"step_{step:06d}") for r in (run_a, run_b))
    files = sorted(os.path.relpath(p, da) for p in glob.glob(os.path.join(da, "*", "*.*")))
    assert files, da
    for name in files:
        if name.endswith(".py"):
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            ta, tb = load_file(os.path.join(da, name)), load_file(os.path.join(db, name))
        else:
            ta = _tensors(torch.load(os.path.join(da, name), weights_only=False))
            tb = _tensors(torch.load(os.path.join(db, name), weights_only=False))
        assert ta.keys() == tb.keys() and ta, name
        for key in ta:
            assert torch.equal(ta[key], tb[key]), (name, key)


def _check(native, runs, tmp_path, name):
    full, first, second = runs
    assert len(full["history"]) == 4
    for x, y in zip(native["history"], full["history"]):
        assert abs(x - y) < 1e-5, (name, native["history"], full["history"])
    assert first["step"] == 2 and second["step"] == 4
    assert first["history"] + second["history"] == full["history"], name
    _assert_same_checkpoint(str(tmp_path / f"{name}_full"), str(tmp_path / f"{name}_split"), 4)


@needs_deepspeed
def test_deepspeed_zero_stages_match_native_and_resume_exactly(tmp_path, monkeypatch):
    ext = tmp_path / "torch_extensions"  # an empty extensions cache: any JIT build lands here
    ext.mkdir()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    runs = [[f"trainer.run_dir={tmp_path / 'native'}"]]
    stages = (0, 1, 2, 3)
    for s in stages:
        engine = ["engine=deepspeed", f"trainer.engine.deepspeed.zero_optimization.stage={s}"]
        runs += _engine_runs(tmp_path, f"zero{s}", engine)
    out = run_distributed(_runs, 2, runs, timeout=300)[0]
    native = out[0]
    for i, s in enumerate(stages):
        _check(native, out[1 + 3 * i : 4 + 3 * i], tmp_path, f"zero{s}")
    assert os.listdir(ext) == [], "DeepSpeed compiled a C++ op"


@needs_accelerate
def test_accelerate_matches_native_and_resumes_exactly(tmp_path):
    runs = [[f"trainer.run_dir={tmp_path / 'native'}"]] + _engine_runs(tmp_path, "acc", ["engine=accelerate"])
    out = run_distributed(_runs, 2, runs, timeout=300)[0]
    _check(out[0], out[1:], tmp_path, "acc")
