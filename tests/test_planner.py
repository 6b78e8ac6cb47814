"""Planner choices on textbook cases (parallel/planner.py over parallel/cost_model.py)."""

import os
from dataclasses import replace

from models.config import ModelConfig
from parallel.cost_model import load_cluster
from parallel.planner import plan, why
from tests.test_cost_model import CONF

H100 = load_cluster(os.path.join(CONF, "cluster", "h100.yaml"))


def _best(choices, cp):
    return next(c for c in choices if c.spec.cp == cp and c.cost.fits)


def test_ulysses_when_heads_allow_and_bandwidth_is_low():
    slow = replace(H100, intra_node_gbps=2.0, inter_node_gbps=2.0)
    cfg = ModelConfig(vocab_size=1024, dim=1024, n_layers=2, n_heads=8, n_kv_heads=8)
    best = _best(plan(cfg, 32768, 8, slow), 8)
    opts = best.spec.options.get("softmax") or {}
    assert best.spec.strategies["softmax"] == "ulysses" or opts.get("ulysses_size") == 8, best.row()


def test_ring_style_overlap_when_bandwidth_is_plenty():
    cfg = ModelConfig(vocab_size=1024, dim=1024, n_layers=2, n_heads=8, n_kv_heads=8)
    best = _best(plan(cfg, 65536, 8, H100), 8)
    assert best.spec.strategies["softmax"] != "allgather", best.row()  # its gather is not hidden


def test_lasp2_for_linear_layers_at_long_length():
    a100 = load_cluster(os.path.join(CONF, "cluster", "a100.yaml"))
    cfg = ModelConfig(vocab_size=1024, dim=1024, n_layers=2, n_heads=8, n_kv_heads=8, mixer_pattern=["linear"])
    best = _best(plan(cfg, 1 << 20, 64, a100), 64)
    assert best.spec.strategies["linear"] == "lasp2", best.row()


def test_cad_for_skewed_document_mixes():
    from bench.cad_sim import doc_lengths

    cfg = ModelConfig(vocab_size=1024, dim=1024, n_layers=2, n_heads=8, n_kv_heads=8)
    n = 1 << 17
    choices = plan(cfg, n, 8, H100, doc_lengths("one_huge", n, seed=0))
    best = _best(choices, 8)
    assert best.spec.strategies["softmax"] == "cad", best.row()
    assert "cad" in why(choices)


def test_allgather_for_short_windows():
    """A window much shorter than a rank's chunk: all-gather (gather="needed") fetches the one
    or two neighbouring chunks, ring still sends every chunk round, Ulysses all the heads. (CAD,
    which fetches exactly the window's rows, ranks above all of them.)"""
    cfg = ModelConfig(vocab_size=1024, dim=2048, n_layers=2, n_heads=32, n_kv_heads=8, sliding_window=512)
    choices = [c for c in plan(cfg, 1 << 17, 8, H100) if c.spec.strategies["softmax"] != "cad"]
    best = _best(choices, 8)
    assert best.spec.strategies["softmax"] == "allgather", best.row()


def test_nothing_fits_says_so():
    tiny = replace(H100, hbm_gib=0.01)
    cfg = ModelConfig(vocab_size=1024, dim=1024, n_layers=2, n_heads=8, n_kv_heads=8)
    choices = plan(cfg, 8192, 8, tiny)
    assert not choices[0].cost.fits and "nothing fits" in why(choices)


def test_plan_command_prints_ranked_choices_and_a_plot(tmp_path, capsys):
    from bench.plan import main

    main(["model=tiny", "data.seq_len=4096", "cluster=a100", "nodes=1", "--top", "3", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "wins:" in out and "tokens_per_s" in out
    assert (tmp_path / "plan.png").stat().st_size > 0


def test_plan_command_names_unknown_clusters():
    import pytest

    from bench.plan import main

    with pytest.raises(ValueError, match="cluster='tpu' has no profile: choose one of"):
        main(["cluster=tpu"])


def test_auto_resolves_composes_and_validates_the_quickstart():
    """parallel.cp.strategies.softmax=auto composes; resolve_auto (called before validation)
    replaces it by a registered strategy, logged with its prediction; the result validates."""
    from hydra import compose, initialize_config_dir

    from parallel.auto import check_prediction, cluster_for_device, resolve_auto
    from trainer.config import validate
    from trainer.train import to_config

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = to_config(
            compose(config_name="train", overrides=["experiment=quickstart", "parallel.cp.strategies.softmax=auto"])
        )
    cfg.parallel.cp.size = 2
    chosen = resolve_auto(cfg, 2, cluster_for_device(CONF, None))
    assert chosen["softmax"]["cluster"] == "cpu" and chosen["softmax"]["step_s"] > 0
    assert cfg.parallel.cp.strategies["softmax"] == chosen["softmax"]["strategy"] != "auto"
    assert set(chosen["softmax"]["considered"]) >= {"allgather", "ring", "ulysses"}
    validate(cfg, world_size=2)
    assert check_prediction(1.0, 1.2) is None and "1.50x" in check_prediction(1.0, 1.5)


def test_cluster_for_device_names():
    from parallel.auto import cluster_for_device

    assert cluster_for_device(CONF, "NVIDIA H100 80GB HBM3").name == "h100"
    assert cluster_for_device(CONF, "NVIDIA A100-SXM4-80GB").name == "a100"
