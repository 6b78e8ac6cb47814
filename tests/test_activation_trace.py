"""The cost model's activation memory (parallel/activation_trace.py): the bytes a block keeps for
backward, extrapolated from small probes, equal a direct trace of that block at other widths and
lengths, for every registered mixer (fp32; bf16 autocast for a few), and the memory parts that
use them."""

import pytest

from models.config import ModelConfig
from models.registry import MIXERS, _load
from parallel.activation_trace import block_activation_bytes, block_saved, block_weight_copy_bytes
from parallel.cost_model import RunSpec, activation_bytes, core_extra_bytes, memory

_load()
MIXER_NAMES = sorted(MIXERS)


def _cfg(mixer: str, **kw) -> ModelConfig:
    base = dict(dim=96, ffn_dim=160, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, mixer_pattern=[mixer])
    return ModelConfig(**{**base, **kw})


@pytest.mark.filterwarnings("ignore:S2 pattern")  # its coverage warning at 2 KV heads
@pytest.mark.parametrize("mixer", MIXER_NAMES)
def test_extrapolated_bytes_equal_a_direct_trace(mixer):
    """640 tokens, dim 96, ffn 160: none of them a probe's (128-384 tokens, widths 64 / 128)."""
    cfg = _cfg(mixer)
    predicted = block_activation_bytes(cfg, 1, 640)
    measured, _ = block_saved(cfg, 1, 1, 640)
    # landmark: one landmark per 51 tokens, so its count is not affine in the length (0.03% here)
    tol = 1e-3 * measured if mixer == "landmark" else 0
    assert abs(predicted - measured) <= tol, (mixer, predicted, measured)


@pytest.mark.parametrize("mixer", ["softmax", "lizard", "mla"])
def test_bf16_autocast_bytes_and_weight_copies(mixer):
    cfg = _cfg(mixer)
    measured, names = block_saved(cfg, 1, 1, 640, "bf16")
    assert block_activation_bytes(cfg, 1, 640, "bf16") == measured
    fp32, _ = block_saved(cfg, 1, 1, 640)
    assert measured < fp32  # the projections' outputs are bf16
    # the copies counted at the real widths: every q / k / v / o and MLP weight, in bf16
    assert {"ffn.gate_proj.weight", "ffn.up_proj.weight", "ffn.down_proj.weight"} <= names
    from models.llama import Block

    block = Block(cfg, 1)
    copied = sum(p.numel() for n, p in block.named_parameters() if n in names)
    assert block_weight_copy_bytes(cfg, 1, "bf16") == 2 * copied
    assert block_weight_copy_bytes(cfg, 1, "fp32") == 0


def test_only_dense_cores_grow_with_the_square_of_the_rank_tokens():
    """landmark keeps dense [T, T] scores: 4x the tokens, about 16x its bytes at long rows;
    softmax and lizard (its meta window through the windowed kernel) grow 4x."""
    grow = {}
    for mixer in ("softmax", "landmark", "lizard"):
        cfg = _cfg(mixer)
        grow[mixer] = block_activation_bytes(cfg, 1, 16384) / block_activation_bytes(cfg, 1, 4096)
    assert grow["softmax"] == pytest.approx(4, rel=1e-3)
    assert grow["lizard"] == pytest.approx(4, rel=1e-3)
    assert grow["landmark"] > 14, grow


def test_memory_parts_use_the_trace():
    cfg = _cfg("softmax", n_layers=3, n_kv_heads=1, mixer_pattern=["softmax", "liger", "gla"])
    spec = RunSpec(model=cfg, seq_len=1024, cp=2, batch=2, dtype="bf16", strategies={"softmax": "ulysses"})
    per_layer = [activation_bytes(spec, i) for i in range(3)]
    assert per_layer[0] == 2 * block_activation_bytes(cfg, 0, 512, "bf16") + core_extra_bytes(spec, 0)
    assert core_extra_bytes(spec, 0) > 0  # Ulysses splits 1 KV head over 2 ranks: replicated
    assert core_extra_bytes(spec, 1) == core_extra_bytes(spec, 2) == 0  # no extra for linear layers
    _, parts = memory(None, spec, n_params=10**6)
    assert parts["activations"] == sum(per_layer)
    assert parts["weight_copies"] == sum(block_weight_copy_bytes(cfg, i, "bf16") for i in range(3)) > 0
    _, ckpt = memory(None, RunSpec(**{**spec.__dict__, "activation_checkpointing": True}), n_params=10**6)
    assert ckpt["weight_copies"] == max(block_weight_copy_bytes(cfg, i, "bf16") for i in range(3))
    _, fp32 = memory(None, RunSpec(**{**spec.__dict__, "dtype": "fp32"}), n_params=10**6)
    assert fp32["weight_copies"] == 0
