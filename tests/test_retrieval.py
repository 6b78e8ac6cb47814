"""The retrieval recipe (conf/recipe/retrieval.yaml): its synthetic documents are in the format the
evaluation scores, its stages chain (pretrain at dp 2, extension at CP=2) with every retrieval
metric reported, and the extension stage gives the same loss curve and accuracy at CP=1 and CP=2."""

from __future__ import annotations

import json
import math
import os
import random
import re

import pytest
import torch
from hydra import compose, initialize_config_dir

from parallel.spawn import run_distributed
from tests.test_train_e2e import CONF, TINY
from trainer.data import ByteTokenizer, passkey_example
from trainer.data.synthetic import QUESTION, kv_recall_example, kv_recall_text, passkey_text

# tiny lengths: L=128 and 2L=256 (a passkey prompt needs 105 bytes); stages: induction (copy),
# pretrain, extend_2x, extend_4x
SHORT = ["recipe=retrieval"] + [f"recipe.stages.{i}.steps={n}" for i, n in enumerate((1, 2, 2, 1))]
SHORT += ["data.seq_len=128", "recipe.stages.0.overrides.data.micro_batch=2"]
SHORT += [f"recipe.stages.{i}.overrides.data.seq_len=256" for i in (2, 3)]
SHORT += ["data.micro_batch=2", "recipe.stages.3.overrides.data.micro_batch=1"]
SHORT += ["trainer.passkey_lengths=[128,256]", "trainer.passkey_depths=[0,1]", "trainer.passkey_samples=1"]
SHORT += ["trainer.mqar_lengths=[128,256]", "trainer.mqar_samples=1", "trainer.mqar_pairs=1"]
SHORT += ["trainer.eval_batches=1", "trainer.eval_position_buckets=4", "trainer.save_every=0"]
SHORT += ["model.rope.original_max_position=128"]


def _compose(overrides):
    from trainer.train import to_config

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return to_config(compose(config_name="train", overrides=TINY + overrides))


def _train(rank, world, overrides, stages=None):
    from trainer.config import StageConfig
    from trainer.train import train

    cfg = _compose(overrides)
    if stages is not None:
        cfg.recipe.stages = [StageConfig(**s) for s in stages]
    out = train(cfg)
    return {"step": out["step"], "history": out["history"], **{k: v for k, v in out.items() if "@" in k}}


def test_training_documents_are_in_the_format_the_evaluation_scores():
    """A passkey / recall training document ends with exactly the prompt tail and answer the
    evaluation feeds and scores: a model that learns the documents is scored on what it learned."""
    tok, rng = ByteTokenizer(), random.Random(0)
    doc = passkey_text(192, 0.5, rng)
    key = doc.split("The pass key is ")[1][:5]
    assert doc.endswith(f"{QUESTION} {key}.") and f"Remember it. {key} is the pass key." in doc
    ids, answer = passkey_example(tok, 160, 0.5, rng)
    assert tok.decode(ids).endswith(QUESTION) and tok.decode(answer)[:1] == " " and len(answer) == 7
    prompt = tok.decode(ids)
    assert prompt.split("The pass key is ")[1][:5] == tok.decode(answer)[1:6]  # the answer is the needle's key
    text = kv_recall_text(400, 3, rng)
    needles = re.findall(r" The ([a-z]{4}) key is (\d{5})\. ", text.split(" What is")[0])
    assert len(needles) == 3 and len(text) == 400
    for word, key in needles:  # every needle is queried once, answered with its key
        assert text.count(f" What is the {word} key? The {word} key is {key}.") == 1
    ids, spans = kv_recall_example(tok, 300, 3, rng)
    assert len(ids) == 300 and len(spans) == 3
    for a, b in spans:
        word = tok.decode(ids[:a]).split("What is the ")[-1][:4]
        needle = tok.decode(ids[: spans[0][0]]).split(f"The {word} key is ")[1][:5]
        assert tok.decode(ids[a:b]) == f" {needle}."
    with pytest.raises(ValueError, match="mqar_pairs"):
        kv_recall_example(tok, 100, 3, rng)


def test_training_rows_hold_retrieval_documents():
    from trainer.batching import build_loaders
    from trainer.data.mix import MixedSource

    cfg = _compose(SHORT + ["data.seq_len=256"])  # the recipe's row length: its documents fit whole

    class Mesh:
        dp_rank, dp = 0, 1

    train, _, tok = build_loaders(cfg, Mesh())
    src = train.dataset.source
    assert isinstance(src, MixedSource) and src.n_passkey > 0 and src.n_mqar > 0
    assert cfg.data.packing == "best_fit" and src.passkey_edge_fraction > 0  # whole documents, needles at the ends
    text = tok.decode(sum((next(train)["input_ids"].flatten().tolist() for _ in range(150)), []))
    assert "What is the pass key? The pass key is" in text and " key? The " in text.replace("pass key?", "")
    from trainer.stages import plan

    induction = plan(cfg)[0].cfg  # its copy documents reach the rows (data.copy_fraction)
    train, _, tok = build_loaders(induction, Mesh())
    assert train.dataset.source.n_copy > 0
    text = tok.decode(sum((next(train)["input_ids"].flatten().tolist() for _ in range(10)), []))
    assert text.count(" | ") > 10


@pytest.mark.e2e
@pytest.mark.gloo
def test_retrieval_recipe_stages_chain_at_cp2(tmp_path):
    run = str(tmp_path / "r")
    out = run_distributed(_train, 2, SHORT + [f"trainer.run_dir={run}"])
    assert out[0]["history"] == out[1]["history"] and out[0]["step"] == 6
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    marks = [(r["stage"], r["at"]) for r in rows if "at" in r]
    stages = ("induction", "pretrain", "extend_2x", "extend_4x")
    assert marks == [(s, at) for s in stages for at in ("start", "end")]
    for r in rows:
        if "at" in r:  # every stage boundary reports both retrieval metrics at both lengths
            assert {"passkey@128", "passkey@256", "passkey@256@1", "mqar@128", "mqar@256"} <= r.keys(), r.keys()
    from trainer.checkpoint import load_run_weights

    meta, _ = load_run_weights(run)
    assert meta["config"]["parallel"]["cp"]["size"] == 2 and meta["config"]["model"]["rope"]["type"] == "yarn"
    written = sorted(f for f in os.listdir(os.path.join(run, "eval")) if f.endswith(".png"))
    assert "extend_4x_accuracy_vs_length.png" in written and "extend_4x_passkey_heatmap.png" in written
    from trainer.worked_example import rope_contrast

    ckpt = os.path.join(run, "checkpoints", "step_000003")  # the pretrain stage's end, kept by the recipe
    for kind in ("linear", "yarn"):  # the README's no-training contrasts evaluate it under default scalings
        m = rope_contrast(ckpt, kind, 4.0, 128)
        assert {"val_loss", "passkey@128", "passkey@256", "mqar@256"} <= m.keys()


@pytest.mark.e2e
@pytest.mark.gloo
@pytest.mark.parametrize("variant", ["retrieval_hybrid", "retrieval_s2"])
def test_retrieval_variants_chain_at_cp2(tmp_path, variant):
    """The hybrid (LASP-2 beside the softmax strategy) and S2 variants run the same stages."""
    run = str(tmp_path / "r")
    extra = ["model.s2_local=1", "model.s2_stride=2"] if "s2" in variant else ["model.n_layers=4"]  # TINY has 2
    short = [f"recipe={variant}", *SHORT[1:], *extra]
    out = run_distributed(_train, 2, short + [f"trainer.run_dir={run}"])
    assert out[0]["history"] == out[1]["history"] and out[0]["step"] == 6
    from trainer.checkpoint import load_run_weights

    meta, _ = load_run_weights(run)
    pattern = meta["config"]["model"]["mixer_pattern"]
    assert meta["config"]["parallel"]["cp"]["size"] == 2 and pattern == _compose(short).model.mixer_pattern
    assert {"passkey@256", "mqar@256"} <= out[0].keys()


@pytest.mark.e2e
@pytest.mark.gloo
def test_extension_stage_is_the_same_at_cp1_and_cp2(tmp_path):
    """The extension stage from the same pretrained weights: loss curve equal to fp32 reduction
    noise and the same retrieval accuracy on one process (CP=1) and on two (CP=2)."""
    pre = str(tmp_path / "pre")
    # large initial weights: attention far from uniform, so positions (RoPE) and every key matter
    args = SHORT + [f"trainer.run_dir={pre}", "model.init_std=0.2"]
    run_distributed(_train, 1, args, [{"name": "pretrain", "steps": 3}])
    curves = {}
    for cp in (1, 2):
        ext = {"name": "extend_2x", "steps": 4}
        ext["overrides"] = {"parallel": {"cp": {"size": cp}}, "data": {"seq_len": 256}}
        ext["overrides"]["model"] = {"rope": {"type": "yarn", "factor": 2.0, "original_max_position": 128}}
        args = SHORT + [f"trainer.run_dir={tmp_path / f'cp{cp}'}", f"init_from={pre}"]
        curves[cp] = run_distributed(_train, cp, args, [ext])[0]
    assert len(curves[1]["history"]) == 4
    for a, b in zip(curves[1]["history"], curves[2]["history"]):
        assert abs(a - b) < 1e-5 * max(1.0, abs(a)), (curves[1]["history"], curves[2]["history"])
    for key in curves[1]:
        if key.startswith(("passkey@", "mqar@")):
            assert curves[1][key] == curves[2][key], key


def test_extension_rope_keeps_the_frequencies_the_pretrained_retrieval_uses():
    """The retrieval recipe's extension RoPE leaves the 5 fastest frequencies (wavelengths of 6 to
    63 tokens) exactly as pretrained and interpolates the slowest by the stage's factor. Measured on
    the pretrained model: halving any one of those 5 drops passkey@256 from about 0.6 to 0-0.2,
    halving the 7th-16th does not (the 6th: 0.45). YaRN's default beta_fast=32 keeps only the
    fastest (original_max_position=256, head_dim 32): the model then scores 0 at 256 untrained."""
    from models.rope import inv_frequencies
    from trainer.stages import plan

    stages = {st.spec.name: st.cfg.model for st in plan(_compose(["recipe=retrieval"]))}
    base, _ = inv_frequencies(stages["pretrain"].rope, stages["pretrain"].hd)
    for name in ("extend_2x", "extend_4x"):
        rope = stages[name].rope
        inv, _ = inv_frequencies(rope, stages[name].hd)
        assert rope.type == "yarn" and rope.original_max_position == 256, (name, rope)
        assert (2 * math.pi / base[:5]).max() < 64
        assert torch.equal(inv[:5], base[:5]), (name, (base / inv).tolist())
        assert torch.allclose(inv[-1], base[-1] / rope.factor), (name, rope.factor)


def test_copy_documents_repeat_one_random_string():
    from trainer.data.synthetic import copy_text

    parts = copy_text(random.Random(3)).split(" | ")
    assert 2 <= len(parts) <= 4 and len(set(parts)) == 1 and 10 <= len(parts[0]) <= 40
    for seed in range(20):  # data.copy_doc_chars / copy_repeats: short strings written many times
        parts = copy_text(random.Random(seed), 3, 5, 6, 8).split(" | ")
        assert 6 <= len(parts) <= 8 and len(set(parts)) == 1 and 3 <= len(parts[0]) <= 5


def test_retrieval_section_and_accuracy_plot(tmp_path):
    """The README renderer shows each stage's start (no training) and end rows at every length,
    and the plots include retrieval vs length with one line per stage."""
    pytest.importorskip("matplotlib")
    from trainer.eval_report import plot_summaries
    from trainer.worked_example import RETRIEVAL_BEGIN, RETRIEVAL_END, render_retrieval

    def stage(name, n, rope, start, end):
        acc = dict(zip(["256", "512", "1024"], end))
        out = dict(name=name, seq_len=n, rope=rope, cp=1 if n == 256 else 2, steps=10, loss_start=2.0, loss_end=1.5)
        out["passkey_prompts"] = 50
        starts = dict(zip(["256", "512", "1024"], start))
        return out | dict(passkey_start=starts, passkey_end=acc, mqar_start={}, mqar_end=acc)

    results = {"command": "torchrun ...", "wall_s": 600, "machine": "2 CPU cores"}
    results["stages"] = [stage("pretrain", 256, "none", [0, 0, 0], [1, 0.2, 0])]
    results["stages"] += [stage("extend_2x", 512, "yarn x2", [1, 0.5, 0], [1, 1, 0.1])]
    text = render_retrieval(results)
    assert text.startswith(RETRIEVAL_BEGIN) and text.endswith(RETRIEVAL_END)
    assert "| extend_2x (start) | 512, RoPE YaRN x2 | 2 | 0 | 2.000 | 1.00 / 0.50 / 0.00 | - / - / - |" in text
    assert "| pretrain | 256, RoPE unscaled | 1 | 10 | 1.500 | 1.00 / 0.20 / 0.00 | 1.00 / 0.20 / 0.00 |" in text
    assert "averaged over the needle depths (50 prompts per length)" in text
    from models.rope import RopeConfig
    from trainer.worked_example import rope_label

    assert rope_label(RopeConfig(type="yarn", factor=2.0, beta_fast=4.0)) == "yarn x2, beta_fast 4"
    assert rope_label(RopeConfig(type="yarn", factor=4.0)) == "yarn x4" and rope_label(RopeConfig()) == "none"
    results["stages"][1]["rope"] = "yarn x2, beta_fast 4"
    assert "| extend_2x | 512, RoPE YaRN x2, beta_fast 4 | 2 | 10 |" in render_retrieval(results)
    from trainer.worked_example import _contrast_row

    metrics = {"val_loss": 3.0, "passkey@256": 0.5, "passkey@512": 0.0, "passkey@256@1": 1.0, "mqar@256": 0.25}
    first = results["stages"][0]
    results["contrasts"] = [_contrast_row(metrics, first, 4.0, kind) for kind in ("linear", "yarn")]
    lines = render_retrieval(results).splitlines()
    at = next(i for i, x in enumerate(lines) if x.startswith("| pretrain |"))
    pi = "| pretrain + PI x4, untrained | 256, RoPE linear x4 | 1 | 0 | 3.000 | 0.50 / 0.00 / - | 0.25 / - / - |"
    assert lines[at + 1] == pi
    assert lines[at + 2].startswith("| pretrain + YaRN (default betas) x4, untrained | 256, RoPE YaRN x4 | 1 | 0 |")
    for st in results["stages"]:
        st |= {"mixers": {"softmax": 2}, "params": 172480}
    results["cpu_s"] = 1200
    hybrid = json.loads(json.dumps(results)) | {"cpu_s": 1800}
    for st in hybrid["stages"]:
        st |= {"mixers": {"simple_gla": 3, "softmax": 1}, "params": 340000, "passkey_end": {"256": 0.25}}
    text = render_retrieval(results, {"retrieval_hybrid": hybrid})
    assert "| `recipe=retrieval` | 2 softmax | 0.17M | 20.0 min | 1.00 / 0.20 / 0.00 | 1.00 / 1.00 / 0.10 |" in text
    assert "| 1.00 / 1.00 / 0.10 | 1.00 / 1.00 / 0.10 | 1.500 / 1.500 |" in text  # MQAR, held-out loss
    assert (
        "| `recipe=retrieval_hybrid` | 3 simple_gla : 1 softmax | 0.34M | 30.0 min | 0.25 / - / - | 0.25 / - / - |"
        in text
    )
    grid = {"lengths": [256, 512], "mean": [1, 0.5], "depths": [0, 1], "accuracy": [[1, 1], [0, 1]]}
    files = plot_summaries({n: {"val_loss": 1.0, "passkey": grid, "mqar": {"256": 1.0}} for n in "ab"}, str(tmp_path))
    assert any(f.endswith("accuracy_vs_length.png") for f in files)


@pytest.mark.parametrize("edge", [0.0, 0.25])
def test_passkey_documents_put_a_share_of_needles_at_the_ends(edge):
    """data.passkey_edge_fraction: that share of passkey documents has the needle first or right
    before the question (the evaluation's depths 0 and 1), which uniform depths almost never give."""
    from trainer.data.mix import MixedSource

    class Corpus:
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return "text " * 20

    mix = MixedSource(Corpus(), passkey_fraction=100.0, passkey_doc_chars=[200], passkey_edge_fraction=edge)
    docs = [mix[i] for i in range(10, 1010)]
    first = sum(d.startswith(" The pass key is ") for d in docs)
    last = sum(re.search(r"\d is the pass key\.  What is the pass key\?", d) is not None for d in docs)
    assert abs(first - 500 * edge) < 60 and abs(last - 500 * edge) < 60, (first, last)
