"""Engines (trainer/engines) on 2 gloo ranks with CP=2 and a hybrid model (LASP-2 + all-gather
KV): DeepSpeed ZeRO 0-3 and Accelerate follow the native engine's loss curve (fp32, 1e-5) and
resume bit-exactly from their own checkpoints; nothing is JIT-compiled; bad engine settings
stop with one line. One spawn per engine (every ZeRO stage in one)."""

import glob
import importlib.util
import json
import os

import pytest
import torch

from parallel.spawn import run_distributed
from tests.test_train_e2e import CONF, TINY, _train
from trainer.engines import ENGINES

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
    """Several trainer runs in one spawn (the process group is reused); a run given as
    (overrides, seconds) gets a SIGUSR1 on rank 0 after that many seconds."""
    out = []
    for run in runs:
        overrides, signal_after = run if isinstance(run, tuple) else (run, None)
        out.append(_train(rank, world, COMMON + overrides, signal_after))
    return out


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


def _grad_norms(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [r["grad_norm"] for r in rows if "grad_norm" in r]


def _check(native, runs, tmp_path, name):
    full, first, second = runs
    assert len(full["history"]) == 4
    for x, y in zip(native["history"], full["history"]):
        assert abs(x - y) < 1e-5, (name, native["history"], full["history"])
    # AdamW is blind to a constant gradient scale, so the losses alone miss a wrong scaling
    # (e.g. grad_accum not divided out): the gradient norms before clipping must match too
    norms, want = _grad_norms(str(tmp_path / f"{name}_full")), _grad_norms(str(tmp_path / "native"))
    assert len(norms) == len(want) > 0 and all(abs(x - y) <= 1e-4 * y for x, y in zip(norms, want)), (name, norms, want)
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
    # and a softmax-only model (Hugging Face has no GLA layers) for the export from ZeRO-3
    runs.append(["engine=zero3", "model.mixer_pattern=[softmax]", f"trainer.run_dir={tmp_path / 'export'}"])
    # bf16 (DeepSpeed's bf16 section, filled from trainer.precision) with activation checkpointing
    runs.append(
        ["engine=zero3", "trainer.precision=bf16", "trainer.activation_checkpointing=true"]
        + [f"trainer.run_dir={tmp_path / 'bf16'}"]
    )
    # a preemption signal under ZeRO-3: the engine writes a checkpoint, every rank stops
    runs.append((["engine=zero3", "trainer.steps=100000", f"trainer.run_dir={tmp_path / 'sig'}"], 4.0))
    out = run_distributed(_runs, 2, runs, timeout=300)[0]
    sig, bf16 = out.pop(), out.pop()
    assert bf16["step"] == 4 and all(abs(x - y) < 0.05 for x, y in zip(bf16["history"], out[0]["history"]))
    assert 0 < sig["step"] < 100000
    assert int(open(tmp_path / "sig" / "checkpoints" / "latest").read()) == sig["step"]
    native = out[0]
    for i, s in enumerate(stages):
        _check(native, out[1 + 3 * i : 4 + 3 * i], tmp_path, f"zero{s}")
    assert os.listdir(ext) == [], "DeepSpeed compiled a C++ op"
    _export_zero3_to_hf(tmp_path)


def _export_zero3_to_hf(tmp_path):
    """A ZeRO-3 checkpoint (sharded parameters) becomes a Hugging Face checkpoint."""
    from hydra import compose, initialize_config_dir

    from models import Transformer
    from models.hf_io import load_hf_checkpoint, save_hf_checkpoint
    from trainer.engines.deepspeed import consolidated_state_dict
    from trainer.train import to_config

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = to_config(compose(config_name="train", overrides=TINY + COMMON + ["model.mixer_pattern=[softmax]"]))
    state = consolidated_state_dict(str(tmp_path / "export" / "checkpoints" / "step_000004"))
    model = Transformer(cfg.model)
    model.load_state_dict(state, strict=True)
    save_hf_checkpoint(model, str(tmp_path / "hf"))
    _, back = load_hf_checkpoint(str(tmp_path / "hf"))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


DEDICATED = {"native", "deepspeed"}  # the reference, and the engine with its own test (ZeRO stages) above


@pytest.mark.parametrize("name", sorted(set(ENGINES) - DEDICATED))
def test_engine_matches_native_and_resumes_exactly(name, tmp_path):
    """Every other registered engine (trainer/engines) with its default settings: a new engine is
    compared here without editing this file."""
    from trainer.engines import check_engine

    try:
        check_engine(_cfg([f"trainer.engine.name={name}"]))
    except ValueError as e:
        if "package" not in str(e):
            raise
        pytest.skip(str(e))  # its package is not installed
    engine = [f"trainer.engine.name={name}"]
    runs = [[f"trainer.run_dir={tmp_path / 'native'}"]] + _engine_runs(tmp_path, name, engine)
    out = run_distributed(_runs, 2, runs, timeout=300)[0]
    _check(out[0], out[1:], tmp_path, name)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = [
    "experiment=quickstart",  # the hybrid model (simple GLA + softmax), CP=2, a few tiny steps
    "trainer.steps=2",
    "trainer.log_every=1",
    "data.seq_len=128",
    "data.micro_batch=1",
    "trainer.passkey_lengths=[]",
    "trainer.eval_batches=1",
    "trainer.device=cpu",
    "logger.wandb=false",
]


def _launch(cmd, run_dir):
    """Run a launcher on the quickstart; the run must reach its last step and checkpoint."""
    import subprocess
    import sys

    from parallel.mesh import free_port

    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    env = dict(os.environ, PATH=path, MASTER_PORT=str(free_port()))
    cmd = [c.replace("PORT", env["MASTER_PORT"]) for c in cmd]
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        cmd + QUICK + [f"trainer.run_dir={run_dir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step=2 loss=" in proc.stdout, proc.stdout[-3000:]
    assert open(os.path.join(run_dir, "checkpoints", "latest")).read() == "2"


@needs_deepspeed
@pytest.mark.slow
def test_deepspeed_launcher_runs_the_quickstart(tmp_path):
    _launch(["bash", "launch/deepspeed.sh"], str(tmp_path / "ds"))


@needs_accelerate
@pytest.mark.slow
def test_accelerate_launch_runs_the_quickstart(tmp_path):
    import sys

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/accelerate/cpu.yaml"]
    cmd += ["--main_process_port", "PORT"]
    _launch(cmd + ["-m", "trainer.train", "engine=accelerate"], str(tmp_path / "acc"))


def _cfg(overrides):
    from hydra import compose, initialize_config_dir

    from trainer.train import to_config

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return to_config(compose(config_name="train", overrides=overrides))


@needs_deepspeed
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["+trainer.engine.deepspeed.optimizer.type=Adam"], "needs a C\\+\\+ op built on first use"),
        (["+trainer.engine.deepspeed.zero_optimization.offload_optimizer.device=cpu"], "needs DeepSpeed's C\\+\\+"),
        (["trainer.engine.deepspeed.gradient_clipping=0.5"], "disagrees with optim.grad_clip"),
        (["trainer.engine.deepspeed.zero_optimization.stage=4"], "must be 0, 1, 2 or 3"),
        (["parallel.dp_mode=fsdp"], "belongs to the native engine"),
        (["trainer.nonfinite=skip"], "trainer.nonfinite=skip is not supported"),
    ],
)
def test_deepspeed_settings_fail_early(overrides, message):
    from trainer.config import validate

    with pytest.raises(ValueError, match=message):
        validate(_cfg(["engine=deepspeed"] + overrides), world_size=1)


@needs_deepspeed
def test_stale_build_lock_is_named(tmp_path, monkeypatch):
    from trainer.config import validate

    lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=f"{lock} exists: .* remove it \\(rm {lock}\\)"):
        validate(_cfg(["engine=deepspeed", "trainer.engine.build_ops=true"]), world_size=1)
    lock.unlink()
    validate(_cfg(["engine=deepspeed", "trainer.engine.build_ops=true"]), world_size=1)


@needs_accelerate
@pytest.mark.parametrize("env", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_accelerate_plugins_on_cpu_are_refused_not_swapped(env, monkeypatch):
    from trainer.config import validate

    monkeypatch.setenv(env, "true")
    with pytest.raises(ValueError, match="which Accelerate replaces by DDP on CPU"):
        validate(_cfg(["engine=accelerate", "trainer.device=cpu"]), world_size=1)


@pytest.mark.skip(
    reason="Accelerate's FSDP and DeepSpeed plugins are GPU paths here: with cpu=True Accelerate silently "
    "swaps FSDP for DDP, and its DeepSpeed plugin runs on CPU only if PartialState(cpu=True) is created "
    "before it, which longctx does not wire (on CPU use engine=deepspeed; launch/accelerate/fsdp.yaml "
    "and deepspeed.yaml are for GPU runs)"
)
def test_accelerate_fsdp_and_deepspeed_plugins():
    pass
