"""Every benchmark module imports (they are not installed and no other test runs them), and the
kernel benchmark runs one tiny cell end to end."""

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
            "--out",
            str(tmp_path),
        ]
    )
    assert (tmp_path / "kernels.csv").exists() and "sdpa" in capsys.readouterr().out
