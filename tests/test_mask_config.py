"""Choosing a mask by configuration (model.mask, model.mask_args): composed through Hydra,
validated with errors naming the settings, built per batch by the context, and the same model
under context parallelism as on one device (fp64)."""

import pytest
import torch
from hydra import compose, initialize_config_dir

from models import ModelConfig, Transformer
from models.context import SingleDeviceContext
from models.ops.attention.slices import MaskRecipe
from parallel.context import CPContext
from parallel.sharding import shard_batch
from parallel.spawn import run_distributed
from parallel.strategies import build_strategy
from tests.cp_check import _loss_and_grads, _model_batch
from tests.test_configs import CONF
from trainer.train import to_config


def test_hydra_composes_a_mask():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        overrides = ["model.mask=prefix_lm", "+model.mask_args={prefix:16}"]  # + : a new key of the dict
        cfg = to_config(compose(config_name="train", overrides=overrides))
    assert cfg.model.mask == "prefix_lm" and dict(cfg.model.mask_args) == {"prefix": 16}


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(mask="tri"), "model.mask='tri' is unknown"),
        (dict(mask="prefix_lm"), "missing \\['prefix'\\]"),
        (dict(mask="block_causal", mask_args={"block": 4, "size": 2}), "unknown \\['size'\\]"),
        (dict(mask="causal", sliding_window=8), "use the mask builder sliding_window"),
        (dict(mask_args={"prefix": 3}), "model.mask is null"),
        (dict(mask="longlora", mask_args={"group": 8}, n_heads=3, n_kv_heads=1, dim=96), "must be even"),
        (dict(mask="causal", mixer_pattern=["s2"], s2_block=16), "applies to softmax layers"),
    ],
)
def test_bad_mask_settings_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kw)


def test_recipes_build_per_batch_from_documents():
    cu = torch.tensor([0, 10, 32, 40, 64])  # row 0: 10 + 22, row 1: 8 + 24
    ctx = SingleDeviceContext(2, 32, cu)
    mask = ctx.slice_mask(MaskRecipe.of("varlen_prefix_lm", {"prefixes": 4}), 4)
    assert [[(s.q0, s.q1) for s in mask.row(b)] for b in range(2)] == [
        [(0, 4), (4, 10), (10, 14), (14, 32)],
        [(0, 4), (4, 8), (8, 12), (12, 32)],
    ]
    assert ctx.slice_mask(MaskRecipe.of("varlen_prefix_lm", {"prefixes": 4}), 4) is mask  # once per batch
    with pytest.raises(ValueError, match="covers 30 tokens, not the batch rows' 32"):
        ctx.slice_mask(MaskRecipe.of("shared_question", {"question": 6, "answers": [12, 12]}), 4)


MASKS = [("prefix_lm", {"prefix": 20}), ("varlen_block_causal", {"block": 7}), ("sinklora", {"group": 16, "sinks": 2})]


def _model_cp(rank, world, strategy, layout):
    n, errs = 64, []
    batch = _model_batch(n)
    for mask, args in MASKS:
        torch.manual_seed(0)
        cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, mask=mask, mask_args=args)
        model = Transformer(cfg).double()
        ref = _loss_and_grads(model, batch, SingleDeviceContext(2, n, batch["cu_seqlens"], 16), None)
        import torch.distributed as dist

        ctx = CPContext(build_strategy(strategy), dist.group.WORLD, rank, world, layout, n, 2, batch["cu_seqlens"], 16)
        got = _loss_and_grads(model, shard_batch(batch, rank, world, layout), ctx, dist.group.WORLD)
        errs.append((mask, (got - ref).abs().max().item()))
    return errs


@pytest.mark.gloo
@pytest.mark.parametrize("strategy,layout", [("ring", "zigzag"), ("allgather", "contiguous"), ("cad", "zigzag")])
def test_configured_mask_same_under_cp(strategy, layout):
    errs = run_distributed(_model_cp, 2, strategy, layout)
    assert max(e for rank in errs for _, e in rank) < 1e-10, errs
