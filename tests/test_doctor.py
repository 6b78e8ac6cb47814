"""longctx-doctor (bench/doctor.py): the short mode CI runs on CPU, and a failing check's exit."""

import json

import pytest

from bench import doctor


@pytest.mark.gloo
@pytest.mark.e2e
def test_doctor_short_on_cpu(tmp_path):
    """Every registered CP strategy (each kind it serves) in fp32 and bf16, the kernel backends and
    the quickstart model for 20 steps: all pass on gloo ranks, and the report says so."""
    from parallel.strategies import STRATEGIES

    assert doctor.main(["--short", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    names = {r["check"]: r for r in report["checks"]}
    for name, cls in STRATEGIES.items():
        for kind in cls.kinds:
            row = names[f"cp/{name}/{kind}"]
            assert row["status"] == "pass", row
            assert row["bf16_err"] <= 2 * row["bf16_one_device_err"] + doctor.BF16_FLOOR
    assert names["kernel/fused-cpu"]["status"] == "pass" and names["engine/native"]["status"] == "pass"
    assert names["engine/native"]["last_loss"] < names["engine/native"]["first_loss"]
    assert "all checks pass" in (tmp_path / "report.md").read_text()


def test_doctor_exit_names_failing_checks(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(doctor, "check_kernels", lambda device, short: [{"check": "kernel/x", "status": "fail"}])
    assert doctor.main(["--short", "--skip", "cp", "engine", "--out", str(tmp_path)]) == 1
    assert "FAILED: kernel/x" in capsys.readouterr().err
    assert "1 failing check(s)**: kernel/x" in (tmp_path / "report.md").read_text()


def test_precision_warning_only_on_gpu():
    env = {"cuda_available": False}
    assert doctor.precision_warning(env) is None
    assert "trainer.precision=bf16" in doctor.precision_warning({"cuda_available": True})


def test_gpu_measurements_run_on_cpu_at_toy_sizes():
    """The GPU-only rows (TFLOP/s, MFU) are code a CPU machine never runs in the doctor: run them
    here at toy sizes so they are ready for the first GPU."""
    import torch

    from models import ModelConfig
    from models.ops.attention import _Attention

    cpu = torch.device("cpu")
    kernel = lambda q, k, v, mask: _Attention.apply(q, k, v, mask, None, 64)[0]  # noqa: E731
    row = doctor._tflops_row("local-kernel", kernel, 128, 2, 1, 16, cpu)
    assert row["tflops"] > 0
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
    row = doctor._mfu_row(cpu, 64, cfg)
    assert row["status"] == "info" and row["tflops"] > 0 and 0 < row["mfu"], row
