"""Whole tiny model under context parallelism: CP=P loss and gradients equal CP=1 (fp32)."""

import pytest
import torch
import torch.distributed as dist

from models import ModelConfig, Transformer
from parallel.context import CPContext
from parallel.sharding import shard_batch
from parallel.spawn import run_distributed
from parallel.strategies import build_strategy

pytestmark = pytest.mark.gloo  # spawns multi-process gloo groups


def _batch(n, b=2, vocab=257, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, n), generator=g)
    labels = torch.randint(0, vocab, (b, n), generator=g)
    # documents of mixed length crossing rank boundaries; positions restart at each document
    starts = sorted({0, 3, 4, n // 3, n - 5, n, n + 1, n + n // 2, 2 * n})
    cu = torch.tensor(starts)
    flat = torch.arange(b * n)
    doc = torch.searchsorted(cu, flat, right=True) - 1
    pos = (flat - cu[doc]).view(b, n)
    return {"input_ids": ids, "labels": labels, "positions": pos, "cu_seqlens": cu}


def _loss_and_grads(rank, world, strategy, layout, window):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, sliding_window=window)
    model = Transformer(cfg)
    batch = _batch(48)
    local = shard_batch(batch, rank, world, layout)
    strat = build_strategy(strategy if world > 1 else "local")
    ctx = CPContext(
        strat, dist.group.WORLD if world > 1 else None, rank, world, layout, 48, 2, batch["cu_seqlens"], block=16
    )
    logits = model(local["input_ids"], local["positions"], ctx)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), local["labels"].flatten(), reduction="sum")
    ce.backward()
    stats = ce.detach().clone()
    dist.all_reduce(stats)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    dist.all_reduce(grads)
    return stats.item() / batch["labels"].numel(), grads


@pytest.mark.parametrize(
    "world,layout,window,strategy",
    [
        (2, "zigzag", None, "allgather"),
        (3, "contiguous", 7, "allgather"),
        (4, "zigzag", 5, "allgather"),
        (3, "zigzag", None, "cad"),
    ],
)
def test_model_cp_matches_single(world, layout, window, strategy):
    ref_loss, ref_grads = run_distributed(_loss_and_grads, 1, "local", "contiguous", window)[0]
    out = run_distributed(_loss_and_grads, world, strategy, layout, window)
    for loss, grads in out:
        assert abs(loss - ref_loss) < 1e-5
        assert (grads - ref_grads).abs().max() < 1e-5


def test_causality_probe():
    """Perturbing token t changes outputs at t and after, never before (within its document)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1)).double()
    ids = torch.randint(0, 257, (1, 30))
    base = model(ids)
    ids2 = ids.clone()
    ids2[0, 12] = (ids2[0, 12] + 1) % 257
    diff = (model(ids2) - base).abs().amax(-1)[0]
    assert (diff[:12] == 0).all() and (diff[12:] > 0).all()


@pytest.mark.parametrize(
    "cu,message",
    [
        ([0, 10, 5, 32], "cu_seqlens is not sorted"),
        ([2, 10, 32], "cu_seqlens runs from 2 to 32: it must start at 0"),
        ([0, 10, 30], "cu_seqlens runs from 0 to 30: .* = 2 \\* 16 = 32"),
    ],
)
def test_context_rejects_bad_cu_seqlens(cu, message):
    with pytest.raises(ValueError, match=message):
        CPContext(build_strategy("local"), None, 0, 1, "contiguous", 16, 2, torch.tensor(cu))


def test_context_attention_checks_its_inputs():
    for name in ("local", "ring", "allgather"):
        ctx = CPContext(build_strategy(name), None, 0, 1, "contiguous", 16, 2, torch.tensor([0, 16, 32]))
        q, kv = torch.zeros(2, 16, 4, 8), torch.zeros(2, 16, 3, 8)
        with pytest.raises(ValueError, match="window=0 must be >= 1 or None"):
            ctx.attention(q, q, q, window=0)
        with pytest.raises(ValueError, match="q has 4 heads, not a multiple of the 3 k/v heads"):
            ctx.attention(q, kv, kv)
        with pytest.raises(ValueError, match=r"q has shape \(2, 12, 4, 8\) but the context holds \[B=2, C=16"):
            ctx.attention(q[:, :12], q, q)
        with pytest.raises(ValueError, match=r"k has shape \(2, 8, 4, 8\)"):
            ctx.linear_attention(q, q[:, :8], q)


def test_every_mixer_under_every_strategy_of_its_kind():
    """The registries' whole product (tests/cp_check.py model_cells) in one spawn: a new mixer,
    kind or strategy is checked here without editing this file."""
    from tests.cp_check import check_model, model_cells

    cells = model_cells()
    assert {c[1] for c in cells} >= {"allgather", "lasp2"}
    for per_rank in run_distributed(check_model, 2, cells, timeout=600):
        bad = [e for e in per_rank if not e[3] < 1e-9]
        assert not bad, bad
