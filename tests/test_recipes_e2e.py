"""Every recipe end to end on CPU (tiny sizes, a few steps): stage transitions in one run dir,
resume in the middle of a stage bit-exact, init_from another run, the evaluation entry point,
and one 2-rank run whose CP size grows between stages."""

import json
import os

import pytest
import torch
from hydra import compose, initialize_config_dir

from parallel.spawn import run_distributed
from tests.test_train_e2e import CONF, TINY

pytestmark = [pytest.mark.e2e]

EVAL = ["trainer.passkey_lengths=[128]", "trainer.passkey_depths=[0.5]", "trainer.passkey_samples=1"]
EVAL += ["trainer.eval_position_buckets=4", "trainer.mqar_lengths=[64]", "trainer.mqar_samples=1"]


def _train(rank, world, overrides, stages=None):
    from trainer.config import StageConfig
    from trainer.train import to_config, train

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = to_config(compose(config_name="train", overrides=TINY + EVAL + overrides))
    if stages is not None:
        cfg.recipe.stages = [StageConfig(**s) for s in stages]
    out = train(cfg)
    return {"step": out["step"], "history": out["history"]}


def _weights(run_dir):
    from trainer.checkpoint import load_run_weights

    return load_run_weights(run_dir)


def _rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_linearize_resumes_at_the_boundary_and_mid_stage_bit_exact(tmp_path):
    common = ["recipe=linearize", "recipe.stages.0.steps=3", "recipe.stages.1.steps=3"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    full = run_distributed(_train, 1, common + [f"trainer.run_dir={a}"])[0]
    parts = [
        run_distributed(_train, 1, common + [f"trainer.run_dir={b}", f"trainer.stop_after={n}"])[0]
        for n in (3, 1, 2)  # stop at the stage boundary, then inside the LoRA stage, then finish
    ]
    assert [p["step"] for p in parts] == [3, 4, 6]
    assert sum((p["history"] for p in parts), []) == full["history"]
    (meta_a, wa), (_, wb) = _weights(a), _weights(b)
    assert meta_a["stage_name"] == "lora" and meta_a["stage_step"] == 3
    assert wa.keys() == wb.keys() and not any("lora" in k for k in wa)  # merged on reading
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    for rows in (_rows(a), [r for r in _rows(b) if "resumed_from" not in r]):
        assert [(r["stage"], r["at"]) for r in rows if "at" in r] == [
            ("transfer", "start"),
            ("transfer", "end"),
            ("lora", "start"),
            ("lora", "end"),
        ]
    assert all("transfer_mse" in r for r in rows if r.get("stage") == "transfer" and "lr" in r)
    assert os.path.exists(os.path.join(a, "eval", "lora.json"))


BRANCH = [  # teacher, a conversion of it, then the teacher again (start_from), trained on
    {"name": "teacher", "steps": 2},
    {"name": "lin", "steps": 2, "overrides": {"model": {"mixer_pattern": ["linear"]}}},
    {"name": "again", "steps": 2, "start_from": "teacher", "overrides": {"optim": {"lr": 1e-4}}},
]


def test_start_from_branches_from_an_earlier_stage_and_resumes_past_it(tmp_path):
    """The branch's start is the teacher's end (same model, same held-out rows), not the stage
    before; resumed after the teacher's end checkpoint would have been pruned (keep 1, save every
    step), the run is bit-exact with the uninterrupted one."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["trainer.save_every=1", "trainer.keep_checkpoints=1"]
    full = run_distributed(_train, 1, common + [f"trainer.run_dir={a}"], BRANCH)[0]
    ends = {(r["stage"], r["at"]): r["val_loss"] for r in _rows(a) if "at" in r}
    assert ends[("again", "start")] == ends[("teacher", "end")] != ends[("lin", "end")]
    parts = [
        run_distributed(_train, 1, common + [f"trainer.run_dir={b}", f"trainer.stop_after={n}"], BRANCH)[0]
        for n in (3, 1, 2)  # inside lin, at its end, then the branch from the pinned checkpoint
    ]
    assert [p["step"] for p in parts] == [3, 4, 6]
    assert sum((p["history"] for p in parts), []) == full["history"]
    assert sorted(os.listdir(os.path.join(b, "checkpoints"))) == ["latest", "step_000002", "step_000006"]
    (_, wa), (_, wb) = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_start_from_must_name_one_earlier_stage():
    from trainer import stages
    from trainer.config import StageConfig
    from trainer.train import to_config

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = to_config(compose(config_name="train", overrides=TINY))
    for bad in ("again", "nope"):  # itself, no stage
        cfg.recipe.stages = [StageConfig(**({**s, "start_from": bad} if s["name"] == "again" else s)) for s in BRANCH]
        with pytest.raises(ValueError, match="exactly one earlier stage"):
            stages.plan(cfg)
    cfg.recipe.stages = [StageConfig(**s) for s in BRANCH]
    cfg.recipe.stages[2].optimizer = "keep"
    with pytest.raises(ValueError, match="optimizer=reset"):
        stages.plan(cfg)


def _evaluate(rank, world, argv):
    from trainer.evaluate import main

    main(argv)
    return True


def test_extend_then_linearize_and_sparsify_from_its_run_dir_then_evaluate(tmp_path):
    ext, lin, out = str(tmp_path / "ext"), str(tmp_path / "lin"), str(tmp_path / "report")
    run_distributed(
        _train,
        1,
        [
            "recipe=extend",
            f"trainer.run_dir={ext}",
            "recipe.stages.0.steps=2",
            "recipe.stages.1.steps=2",
            "recipe.stages.0.overrides.data.seq_len=128",
            "recipe.stages.1.overrides.data.seq_len=256",
            "data.long_min_chars=30000",
            "data.passkey_fraction=0.5",
        ],
    )
    meta, weights = _weights(ext)
    assert meta["config"]["data"]["seq_len"] == 256 and meta["config"]["model"]["rope"]["factor"] == 4.0
    k = "layers.0.mixer.k_proj.weight"
    assert weights[k].shape == (64 // 4 * 2, 64)  # GQA softmax teacher
    run_distributed(
        _train,
        1,
        ["recipe=linearize", f"trainer.run_dir={lin}", f"init_from={ext}", "recipe.stages.0.steps=2"]
        + ["recipe.stages.1.steps=1"],
    )
    _, converted = _weights(lin)
    assert torch.equal(converted["embed.weight"], weights["embed.weight"])  # carried, never trained
    assert converted[k].shape == (64, 64)  # the linear layer's k: each kv head repeated
    sp = str(tmp_path / "sp")  # softmax -> S2: the attention weights carry over unchanged (ffn alone trains)
    ffn = '["*.ffn.*"]'
    run_distributed(
        _train,
        1,
        ["recipe=sparsify", f"trainer.run_dir={sp}", f"init_from={ext}", "recipe.stages.0.steps=1"]
        + ["recipe.stages.1.steps=1", "recipe.stages.1.overrides.data.seq_len=256"]
        + [f"recipe.stages.0.train_params={ffn}", f"recipe.stages.1.train_params={ffn}"],
    )
    meta, sparse = _weights(sp)
    assert meta["config"]["model"]["mixer_pattern"] == ["s2", "s2", "s2", "softmax"]
    q = "layers.0.mixer.q_proj.weight"
    assert torch.equal(sparse[q], weights[q]) and not torch.equal(
        sparse["layers.0.ffn.up_proj.weight"], weights["layers.0.ffn.up_proj.weight"]
    )
    run_distributed(_evaluate, 1, [lin, "--out", out, "trainer.eval_batches=1", "trainer.passkey_lengths=[128]"])
    summary = json.load(open(os.path.join(out, "lin.json")))
    assert len(summary["loss_by_position"]["loss"]) == 4 and summary["passkey"]["lengths"] == [128]
    assert os.path.exists(os.path.join(out, "lin_loss_by_position.png"))


def test_cpu_example_recipe_runs(tmp_path):
    run = str(tmp_path / "ex")
    names = ["pretrain", "extend", "transfer", "lora", "lolcats_transfer", "lolcats_lora", "liger_lora"]
    names += ["lizard_transfer", "lizard_lora"]
    short = [f"recipe.stages.{i}.steps=1" for i in range(len(names))]
    short += [f"recipe.stages.{i}.overrides.data.seq_len=128" for i in range(1, len(names))]
    out = run_distributed(_train, 1, ["recipe=cpu_example", f"trainer.run_dir={run}"] + short)[0]
    assert out["step"] == len(names)
    written = sorted(f for f in os.listdir(os.path.join(run, "eval")) if f.endswith(".json"))
    assert written == sorted(f"{s}{at}.json" for s in names for at in ("", "_start"))


@pytest.mark.gloo
def test_two_ranks_cp_grows_between_stages(tmp_path):
    """pretrain at dp 2 x cp 1, then attention transfer (softmax teacher over all-gather, linear
    student over LASP-2) and LoRA at cp 2."""
    hybrid = {"mixer_pattern": ["linear", "softmax"], "linear_feature_map": "hedgehog", "linear_normalize": True}
    hybrid |= {"linear_rope": True, "linear_output_norm": False, "linear_output_gate": False}
    cp2 = {"parallel": {"cp": {"size": 2}}, "model": hybrid}
    stages = [
        {"name": "pre", "steps": 2},
        {"name": "transfer", "steps": 2, "objective": "attention_transfer", "train_params": ["*_map.*"]},
        {"name": "lora", "steps": 2, "lora_rank": 4, "train_params": ["*.lora_*"], "optimizer": "keep"},
    ]
    for s in stages[1:]:
        s["overrides"] = cp2
    out = run_distributed(_train, 2, [f"trainer.run_dir={tmp_path / 'r'}"], stages)
    assert out[0]["history"] == out[1]["history"] and out[0]["step"] == 6
    assert all(x == x for x in out[0]["history"])
    meta, _ = _weights(str(tmp_path / "r"))
    assert meta["config"]["parallel"]["cp"]["size"] == 2 and meta["stage_name"] == "lora"
