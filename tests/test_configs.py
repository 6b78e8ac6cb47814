"""Every file in conf/ composes and validates; bad values stop with a clear message."""

import glob
import os

import pytest
from hydra import compose, initialize_config_dir

from trainer.config import validate
from trainer.train import to_config

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def _compose(overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return to_config(compose(config_name="train", overrides=overrides))


def _options(group):
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(f"{CONF}/{group}/*.yaml"))


@pytest.mark.parametrize("name", _options("experiment"))
def test_experiment_composes_and_validates(name):
    cfg = _compose([f"experiment={name}"])
    validate(cfg, world_size=cfg.parallel.cp.size * 2)


@pytest.mark.parametrize("name", _options("recipe"))
def test_recipe_composes_and_every_stage_validates(name):
    from trainer.stages import plan

    cfg = _compose([f"recipe={name}"])
    stages = plan(cfg)
    assert len(stages) == len(cfg.recipe.stages) >= 1  # one stage: e.g. liger (LoRA only), landmark
    for st in stages:
        validate(st.cfg, world_size=st.cfg.parallel.cp.size)
        assert st.cfg.trainer.steps == st.spec.steps
    assert [s.offset for s in stages] == [sum(x.spec.steps for x in stages[:i]) for i in range(len(stages))]


@pytest.mark.parametrize("name", _options("recipe"))
def test_attention_transfer_stages_train_only_mixer_parameters(name):
    """The transfer loss is each mixer's output: a pattern that also reaches the FFN (``*.gate_*``
    matches ``ffn.gate_proj``) would train it to ease the next layer's match, at the model's
    expense."""
    import fnmatch

    from models import Transformer
    from trainer.stages import plan

    for st in plan(_compose([f"recipe={name}", "model.n_layers=1"])):
        if st.spec.objective != "attention_transfer":
            continue
        model = Transformer(st.cfg.model)
        names = [n for n, _ in model.named_parameters()]
        trained = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in st.spec.train_params)]
        assert trained and all(".mixer." in n for n in trained), (st.spec.name, trained)


def test_recipe_stage_overrides_apply_on_top_of_the_run():
    from trainer.stages import plan

    stages = plan(_compose(["recipe=cpu_example", "model.dim=64"]))
    assert [s.cfg.data.seq_len for s in stages] == [512] + [1024] * 8
    assert all(s.cfg.model.dim == 64 for s in stages)
    assert stages[3].cfg.model.mixer_pattern == ["linear", "linear", "linear", "softmax"]
    assert stages[3].cfg.optim.lr == 3e-4 and stages[2].cfg.optim.lr == 1e-2


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["recipe=linearize", "+recipe.stages.0.overrides.optim.lrr=1"],
            r"recipe.stages\[0\] \(transfer\).overrides.optim.lrr is not a setting",
        ),
        (["recipe=linearize", "recipe.stages.0.objective=kl"], r"objective='kl' is unknown"),
        (["recipe=linearize", "recipe.stages.1.optimizer=sgd"], r"optimizer='sgd' is unknown: choose reset or keep"),
        (
            ["recipe=linearize", "recipe.stages.0.overrides.model.mixer_pattern=[softmax]"],
            "attention_transfer needs linear layers",
        ),
        (["recipe=extend", "+recipe.stages.1.overrides.optim.lr=fast"], r"recipe.stages\[1\] \(extend_2k\).overrides"),
        (["data.long_ratio=1.5"], r"data.long_ratio=1.5 must be in \(0, 1\)"),
        (["trainer.passkey_depths=[2.0]"], r"trainer.passkey_depths has 2.0"),
        (["trainer.passkey_lengths=[64]"], r"trainer.passkey_lengths has 64: a passkey prompt needs at least"),
    ],
)
def test_bad_recipe_values_have_clear_errors(overrides, message):
    from trainer.stages import plan

    with pytest.raises(ValueError, match=message):
        cfg = _compose(overrides)
        validate(cfg, world_size=1)
        plan(cfg)


@pytest.mark.parametrize("group", ["model", "parallel", "data", "optim", "trainer", "logger", "engine"])
def test_every_group_option_composes(group, tmp_path):
    if group == "engine":
        pytest.importorskip("deepspeed", reason="engine=deepspeed needs deepspeed (the test extra)")
        pytest.importorskip("accelerate", reason="engine=accelerate needs accelerate (the test extra)")
    for option in _options(group):
        overrides = [f"{group}={option}"]
        if group == "data" and option == "files":
            overrides.append(f"data.paths=[{CONF}]")
        if group == "data" and option == "prepared":
            from trainer.prepare import prepare

            (tmp_path / "doc.txt").write_text("a document")
            prepare([str(tmp_path / "doc.txt")], str(tmp_path / "prepared"), workers=0, progress=False)
            overrides.append(f"data.paths=[{tmp_path / 'prepared'}]")
        cfg = _compose(overrides)
        validate(cfg, world_size=cfg.parallel.cp.size)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.mixer_pattern=[softmax,mamba]"], "model.mixer_pattern has unknown mixer 'mamba'"),
        (["model.n_heads=4", "model.n_kv_heads=3"], "not divisible by model.n_kv_heads=3"),
        (["parallel=cp2", "data.seq_len=1001"], "not divisible by 2\\*cp=4 for zigzag"),
        (["parallel.cp.strategies.softmax=warp"], "parallel.cp.strategies.softmax=.warp. is unknown"),
        (["parallel.cp.strategies.softmax=lasp2"], "serves linear layers, not softmax ones"),
        (
            ["model.mixer_pattern=[gla,softmax]", "parallel.cp.strategies.linear=ring"],
            "serves softmax and sparse layers, not linear ones",
        ),
        (["+parallel.cp.options.ulysses_size=2"], "options are per mixer kind now"),
        (["experiment=s2_quickstart", "model.s2_offsets=[3,2]"], "model.s2_offsets has 2 entries"),
        (["experiment=s2_quickstart", "parallel.cp.strategies.sparse=lasp2"], "serves linear layers, not sparse"),
        (["model.mixer_pattern=[s2]", "model.s2_local=0"], "model.s2_local=0 must be >= 1"),
        (
            ["data.tokenizer=hf", "data.tokenizer_path=/nonexistent/tok"],
            "data.tokenizer_path='/nonexistent/tok' does not exist",
        ),
        (["init_from=/nonexistent/ckpt"], "init_from='/nonexistent/ckpt' is not a directory"),
        (["data.mask=prefix_lm"], "data.mask=prefix_lm needs prompt/completion data, but data.source=stdlib"),
        (["data=sft", "data.mask=bidirectional"], "data.mask='bidirectional' is unknown"),
        (["data=sft", "data.passkey_fraction=1.0"], r"the text mix \{'passkey_fraction': 1.0\} does not apply"),
        (["data=sft", "data.mask=prefix_lm", "model.sliding_window=64"], "both mask softmax attention: drop one"),
        (["recipe=longlora", "model.mask_args.group=1024"], r"group=1024 covers the whole row .*e.g. 256"),
        (["recipe=sinklora", "model.mask_args.sinks=200"], r"sinks=200 must lie in 0..group/2=128"),
        (["recipe=longlora", "model.n_heads=3", "model.n_kv_heads=1", "model.head_dim=32"], "n_heads=3 must be even"),
        (["trainer.precision=fp8"], "trainer.precision='fp8' is unknown"),
        (["optim.grad_clip=-1"], "optim.grad_clip=-1.0 must be >= 0: give the max gradient norm, or 0"),
        (["optim.lr=0"], "optim.lr=0.0 must be > 0"),
        (["optim.lr=-1e-3"], "optim.lr=-0.001 must be > 0"),
        (["model.n_heads=0"], "model.n_heads=0 must be >= 1"),
        (["model.n_kv_heads=0"], "model.n_kv_heads=0 must be >= 1"),
        (["+trainer.nonexistent=1"], "trainer.nonexistent is not a setting: remove it or fix its spelling"),
        (["trainer.nonfinite=ignore"], "trainer.nonfinite='ignore' is unknown"),
        (["trainer.max_skips=0"], "trainer.max_skips=0 must be >= 1"),
        (["trainer.loss_chunk_tokens=-1"], "trainer.loss_chunk_tokens=-1 must be >= 0"),
        (["trainer.peak_tflops=0"], "trainer.peak_tflops=0.0 must be > 0"),
        (["trainer.engine.name=fast"], "trainer.engine.name='fast' is unknown: choose one of"),
        (["trainer.engine.build_ops=true"], "trainer.engine.build_ops is a setting of the deepspeed engine, which"),
        (["+parallel.cp.options.softmax.regather=1"], "parallel.cp.options.softmax.regather=1 must be true or false"),
        (["+parallel.cp.options.softmax.gather=some"], "parallel.cp.options.softmax.gather='some' is unknown"),
        (["+parallel.cp.options.softmax.gathr=all"], r"has \['gathr'\], which strategy 'allgather' does not take"),
        (
            ["model.mixer_pattern=[gla]", "parallel.cp.strategies.linear=lasp1"]
            + ["+parallel.cp.options.linear.recompute=2"],
            "parallel.cp.options.linear.recompute=2 must be true or false",
        ),
        (
            ["parallel.cp.strategies.softmax=usp", "+parallel.cp.options.softmax.ulysses_size=x"],
            "parallel.cp.options.softmax.ulysses_size='x' must be an int or null",
        ),
    ],
)
def test_bad_values_have_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):  # raised while composing or validating
        cfg = _compose(overrides)
        validate(cfg, world_size=cfg.parallel.cp.size)


def test_cp_size_must_divide_world():
    cfg = _compose(["parallel=cp2"])
    with pytest.raises(ValueError, match="parallel.cp.size=2 does not divide the world size 3"):
        validate(cfg, world_size=3)


def test_unknown_key_is_rejected():
    with pytest.raises(Exception, match="lrr"):
        _compose(["optim.lrr=1"])
    with pytest.raises(ValueError, match="optim.lrr is not a setting.*optim has: lr, min_lr_ratio"):
        _compose(["+optim.lrr=1"])


def test_removed_strategy_aliases_are_rejected():
    for key in ("strategy", "linear_strategy"):  # the old aliases of parallel.cp.strategies.<kind>
        with pytest.raises(ValueError, match=f"parallel.cp.{key} is not a setting.*parallel.cp has: size, strategies"):
            _compose([f"+parallel.cp.{key}=ring"])


def test_strategies_follow_the_model_kinds():
    from trainer.config import cp_strategies

    cfg = _compose(["experiment=quickstart", "parallel.cp.strategies.softmax=ring"])
    assert {k: s.name for k, s in cp_strategies(cfg).items()} == {"linear": "lasp2", "softmax": "ring"}
    cfg = _compose(["model.mixer_pattern=[softmax]", "parallel.cp.strategies.linear=nonsense"])
    assert list(cp_strategies(cfg)) == ["softmax"]  # only kinds the model uses are built


def test_strategy_options_reach_the_strategy():
    from trainer.config import cp_strategies

    assert cp_strategies(_compose(["parallel=cp2"]))["softmax"].regather  # allgather re-gathers K/V
    cfg = _compose(["parallel=cp2", "+parallel.cp.options.softmax.regather=false"])
    validate(cfg, world_size=2)
    assert not cp_strategies(cfg)["softmax"].regather
    with pytest.raises(ValueError, match="parallel.cp.options.softmax.regather='no' must be true or false"):
        cp_strategies(_compose(["parallel=cp2", "+parallel.cp.options.softmax.regather=no"]))


def test_grad_clip_zero_means_off():
    cfg = _compose(["optim.grad_clip=0"])
    validate(cfg, world_size=1)


def test_empty_tokenizer_dir_names_the_setting(tmp_path):
    cfg = _compose(["data.tokenizer=hf", f"data.tokenizer_path={tmp_path}"])
    with pytest.raises(ValueError, match="data.tokenizer_path=.* holds no tokenizer .*set data.tokenizer=byte"):
        validate(cfg, world_size=1)


def test_wrong_type_is_rejected_while_composing():
    """The typed schema is the base of conf/train.yaml, so Hydra names the override."""
    with pytest.raises(Exception, match="Error merging override optim.lr=fast"):
        _compose(["optim.lr=fast"])


def test_loss_chunk_reaches_the_model():
    import torch

    from trainer.train import build_model

    cfg = _compose(["trainer.loss_chunk_tokens=24", "model.n_layers=1"])
    assert build_model(cfg, torch.device("cpu")).loss_head.keywords == {"chunk": 24}


@pytest.mark.parametrize("name,args", [("longlora", ["group"]), ("sinklora", ["group", "sinks"])])
def test_sparse_lora_recipes_and_their_full_attention_contrast(name, args):
    """recipe=longlora / sinklora train under their mask with LoRA+ (q/k/v/o, embeddings, norms);
    the contrast drops the mask and its arguments on the command line."""
    from trainer.stages import plan

    st = plan(_compose([f"recipe={name}"]))[0]
    assert st.cfg.model.mask == name and st.cfg.model.mask_args["group"] == st.cfg.data.seq_len // 4
    assert st.spec.lora_rank > 0 and set(st.spec.lora_targets) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert {"embed.*", "*norm.*"} <= set(st.spec.train_params)
    full = _compose([f"recipe={name}", "model.mask=null"] + [f"~model.mask_args.{a}" for a in args])
    assert full.model.mask is None and not full.model.mask_args
    validate(full, world_size=1)
