"""Every benchmark module imports (they are not installed and no other test runs them), and the
kernel benchmark runs one tiny cell end to end."""

import csv
import importlib
import pkgutil

import pytest

import bench

MODULES = sorted(m.name for m in pkgutil.iter_modules(bench.__path__))


@pytest.mark.parametrize("name", MODULES)
def test_bench_module_imports(name):
    module = importlib.import_module(f"bench.{name}")
    assert name == "runner" or hasattr(module, "main"), f"bench.{name} has no main()"


def test_kernel_bench_runs_a_tiny_cell(tmp_path, capsys):
    from bench.kernels import main

    main(
        [
            "--seq-lens",
            "64",
            "--kv-heads",
            "2",
            "--head-dim",
            "8",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--train-seq-lens",
            "64",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert (tmp_path / "kernels.csv").exists() and "sdpa" in out and "targets" in out
    with open(tmp_path / "kernels.csv") as f:
        rows = list(csv.DictReader(f))
    impls = {r["impl"] for r in rows}
    # fla-core is in the test extra: the linear rows compare against fla's own torch references
    assert {"fla_naive", "fla_simple_gla", "hf"} <= impls, impls
    for r in rows:  # every implementation computes the same outputs and gradients (training step: loss), fp32
        assert float(r["max_err"]) < 1e-4, r


def test_mask_bench_matches_its_formulas_and_peers(tmp_path):
    """bench.masks at a small row, worlds 1 and 2: every strategy and peer is exact against the
    single-device kernel, and every strategy's measured bytes equal its formula for the mask."""
    from bench.masks import main

    main(["--seq-lens", "128", "--world-sizes", "1", "2", "--repeats", "1", "--head-dim", "8", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "masks.csv")))
    strategies = {r["strategy"] for r in rows}
    assert {
        "local",
        "allgather",
        "ring",
        "ulysses",
        "usp",
        "cad",
        "peer:sdpa_mask",
        "peer:flex(fwd only)",
    } <= strategies
    for r in rows:
        assert float(r["max_err"]) < 1e-4, r
        assert r["bytes_max"] == r["bytes_formula"], r
    assert (tmp_path / "masks.png").exists()


def test_s2_short_bench_paths_agree(tmp_path):
    """bench.s2_short at one tiny row: the pattern kernel's tile plan, its masked call and its
    own choice give the same outputs and gradients (fp32), and the train-step cells run."""
    from bench.s2_short import main

    main(["--seq-lens", "40", "--train-seq-lens", "40", "--batch", "2", "--repeats", "1", "--out", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "s2_short.csv")))
    kernel = {r["impl"]: r for r in rows if r["cell"] == "kernel"}
    assert set(kernel) == {"tiles", "masked_call", "auto", "dense"}
    assert all(float(r["max_err"]) < 1e-5 for r in kernel.values()), kernel
    assert {r["impl"] for r in rows if r["cell"] == "train_step"} == {"s2", "softmax"}
    assert (tmp_path / "s2_short.png").exists()
