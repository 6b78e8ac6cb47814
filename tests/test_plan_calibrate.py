"""The cost model's bytes equal what parallel.comm counts, for every strategy over a grid of
shapes on real gloo processes (bench.cp / bench.linear_cp rows, which print the prediction beside
the measurement), and its saved-memory count of the core op equals bench.cp's. (Times at these small
shapes are dominated by per-call overheads; ``python -m bench.plan --calibrate`` compares them
at 2K-4K tokens.)"""

import csv

import pytest

from bench import cp, linear_cp
from bench.plan_calibrate import compare
from parallel.cost_model import load_cluster
from tests.test_cost_model import CONF

pytestmark = pytest.mark.gloo


def test_predicted_bytes_equal_measured_for_every_strategy(tmp_path):
    cluster = load_cluster(f"{CONF}/cluster/cpu.yaml")
    args = ["--world-sizes", "2", "4", "--seq-lens", "256", "512", "--repeats", "1", "--out", str(tmp_path)]
    cp.main(args + ["--masks", "causal", "docs", "--no-peers", "--heads", "4", "--kv-heads", "2"])
    linear_cp.main(args + ["--masks", "causal", "--strategies", "lasp2", "lasp2:zigzag", "lasp1"])
    rows = compare(list(csv.DictReader(open(tmp_path / "cp.csv"))), cluster, 4, 2, 32)
    lin = list(csv.DictReader(open(tmp_path / "linear_cp.csv")))
    rows_lin = compare(lin, cluster, 4, 4, 32, kind="linear", layout="contiguous")
    names = {r["strategy"] for r in rows + rows_lin}
    assert {"allgather", "ring", "ulysses", "usp", "cad", "lasp2", "lasp2:zigzag", "lasp1"} <= names
    for r in rows + rows_lin:
        assert r["bytes_equal"], r
    for r in list(csv.DictReader(open(tmp_path / "cp.csv"))) + lin:  # the benchmarks print the prediction
        assert r["predicted_bytes"] == r["bytes_per_rank"] and float(r["predicted_ms"]) > 0, r
    for r in rows:  # the core op's saved tensors (bench.cp's CPU peak_mem_mb, rounded to 0.01 MiB)
        assert abs(r["predicted_mem_mb"] - r["measured_mem_mb"]) <= 0.011 + 0.01 * r["measured_mem_mb"], r
