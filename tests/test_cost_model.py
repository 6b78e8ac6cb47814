"""The cost model (parallel/cost_model.py): profiles load and validate, its bytes are the
strategies' own formulas, its reproductions of published figures hold (bench/plan_reproduce.py)."""

import glob
import os

import pytest

from bench import plan_reproduce
from models.config import ModelConfig
from parallel.cost_model import Cluster, RunSpec, layer_cost, load_cluster, step_cost
from parallel.strategies import LayerShape, build_strategy

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
PROFILES = sorted(glob.glob(os.path.join(CONF, "cluster", "*.yaml")))


@pytest.mark.parametrize("path", PROFILES, ids=os.path.basename)
def test_every_cluster_profile_loads_and_validates(path):
    c = load_cluster(path)
    assert c.name == os.path.splitext(os.path.basename(path))[0]
    text = open(path).read()
    for line in text.splitlines()[1:]:  # every value carries its source
        if line and not line.startswith(("#", "source", "name")):
            assert "#" in line, f"{path}: {line!r} has no source comment"


def test_bad_profiles_have_clear_errors():
    good = vars(load_cluster(os.path.join(CONF, "cluster", "h100.yaml")))
    with pytest.raises(ValueError, match="unknown keys .'nvlink'."):
        Cluster.from_dict({**good, "nvlink": 1})
    with pytest.raises(ValueError, match="lacks .'gpus_per_node'."):
        Cluster.from_dict({k: v for k, v in good.items() if k != "gpus_per_node"})
    with pytest.raises(ValueError, match="gemm_fraction=1.5 must be in"):
        Cluster.from_dict({**good, "gemm_fraction": 1.5})


CFG = ModelConfig(vocab_size=64, dim=256, n_layers=2, n_heads=8, n_kv_heads=4, head_dim=32)


@pytest.mark.parametrize("name", ["allgather", "ring", "ulysses", "usp"])
@pytest.mark.parametrize("cp,n", [(2, 1024), (4, 4096), (8, 8192)])
def test_bytes_are_the_strategy_formula(name, cp, n):
    cl = load_cluster(os.path.join(CONF, "cluster", "h100.yaml"))
    c = layer_cost(cl, RunSpec(CFG, n, cp=cp, strategies={"softmax": name}), 0)
    shape = LayerShape(1, n, cp, 8, 4, 32, 2, "zigzag")
    assert c.fwd_bytes == build_strategy(name).forward_bytes(shape)


def test_linear_bytes_are_lasp_formulas_and_flat_in_length():
    cl = load_cluster(os.path.join(CONF, "cluster", "a100.yaml"))
    lin = ModelConfig(vocab_size=64, dim=256, n_layers=1, n_heads=8, n_kv_heads=8, mixer_pattern=["linear"])
    a = layer_cost(cl, RunSpec(lin, 4096, cp=4, strategies={"linear": "lasp2"}), 0)
    b = layer_cost(cl, RunSpec(lin, 65536, cp=4, strategies={"linear": "lasp2"}), 0)
    assert a.fwd_bytes == b.fwd_bytes == build_strategy("lasp2").forward_bytes(LayerShape(1, 4096, 4, 8, 8, 32, 2))


def test_unfit_configuration_is_refused_with_the_setting():
    cl = load_cluster(os.path.join(CONF, "cluster", "h100.yaml"))
    with pytest.raises(ValueError, match="parallel.cp.size"):
        step_cost(cl, RunSpec(CFG, 4096, cp=16, strategies={"softmax": "ulysses"}))


def test_reproductions_hold():
    """A change to the model, a profile or a strategy's formula that moves a reproduced figure
    out of tolerance, or makes an unexplained one, fails here."""
    for case in plan_reproduce.all_cases(CONF):
        if case.expect_reproduced:
            assert case.reproduced, f"{case.name}: predicted {case.predicted:.3g} vs published {case.published:.3g}"
        else:
            assert case.why, f"{case.name} is not reproduced and does not say why"
    by_name = {c.name: c for c in plan_reproduce.all_cases(CONF)}
    ring = by_name["ring-flash-attn: plain ring, % of ideal"]
    zig = by_name["ring-flash-attn: zigzag ring, % of ideal"]
    assert zig.predicted > ring.predicted  # zigzag balances causal work
    assert by_name["DistCA: CAD over all-gather KV, end-to-end"].predicted > 1.0
    assert by_name["LASP-2 over LASP-1 at 2048K, speed-up %"].predicted > 0
