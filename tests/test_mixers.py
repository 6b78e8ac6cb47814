"""Every registered mixer (models.registry), inside a tiny model, against its kind's naive
reference: the logits and every parameter gradient in fp64 with packed documents. The list comes
from the registry, so a new mixer (or kind) is tested without editing this file; under context
parallelism every mixer meets every strategy of its kind in tests/test_model_cp.py."""

import pytest
import torch

from models import ModelConfig, Transformer
from models.context import SingleDeviceContext
from models.registry import MIXERS, mixer_kinds, reference_op

mixer_kinds()  # loads the registry
B, T = 2, 37
CU = torch.tensor([0, 1, 12, 30, 37, 40, 41, 74])  # length-1 docs, docs across block edges
# sizes at which every mixer's structure shows in 37 tokens: S2 blocks of 16 with stride 2,
# linear chunks of 8, softmax kernel blocks of 16, windows of two-kind layers of 5, landmark blocks of 5
SMALL = dict(s2_block=16, s2_stride=2, linear_chunk_size=8, hybrid_window=5, landmark_every=4)


class ReferenceContext(SingleDeviceContext):
    """Runs every kind through its registered naive reference instead of its op."""

    def run(self, kind, q, k, v, **options):
        return reference_op(kind)(q, k, v, self, **self.bind(options))  # bind: as the op path does


def _positions():
    flat = torch.arange(B * T)
    return (flat - CU[torch.searchsorted(CU, flat, right=True) - 1]).view(B, T)


def _logits_and_grads(model, ctx):
    model.zero_grad(set_to_none=True)
    ids = torch.randint(0, 61, (B, T), generator=torch.Generator().manual_seed(0))
    out = model(ids, _positions(), ctx)
    out.logsumexp(-1).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_mixer_matches_its_kind_reference(name):
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, mixer_pattern=[name], **SMALL)
    torch.manual_seed(0)
    model = Transformer(cfg).double()
    for p in model.parameters():  # non-trivial weights (the model's init zeroes biases)
        torch.nn.init.normal_(p, std=0.2)
    out, grads = _logits_and_grads(model, SingleDeviceContext(B, T, CU, block=16))
    ref, ref_grads = _logits_and_grads(model, ReferenceContext(B, T, CU, block=16))
    assert (out - ref).abs().max() < 1e-10, name
    for n, g in grads.items():
        assert g is not None and (g - ref_grads[n]).abs().max() < 1e-10, (name, n)


def test_every_kind_has_a_reference_and_a_cp_strategy():
    from parallel.strategies import DEFAULTS

    for kind in mixer_kinds():
        assert callable(reference_op(kind))
        assert kind in DEFAULTS, f"mixer kind {kind!r} has no default context-parallel strategy"


def test_mixer_options_are_the_model_config_keys():
    """Each registered options dataclass's field f is the key model.<prefix>_f (default None: the
    dataclass holds the default, once), and every such key belongs to one."""
    import dataclasses

    from models.registry import OPTIONS

    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    owned = {f"{p}_{f.name}" for p, cls in OPTIONS.items() for f in dataclasses.fields(cls)}
    assert owned <= set(fields), sorted(owned - set(fields))
    assert all(fields[k].default is None for k in owned), [k for k in owned if fields[k].default is not None]
    stray = {k for k in fields if any(k.startswith(p + "_") for p in OPTIONS)} - owned
    assert not stray, f"ModelConfig keys of no options dataclass: {sorted(stray)}"


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(linear_impl="fast"), "model.linear_impl='fast' is unknown: choose auto, chunk or naive"),
        (dict(linear_feature_map="tanh"), "model.linear_feature_map='tanh' is unknown"),
        (dict(linear_chunk_size=0), "model.linear_chunk_size=0 must be >= 1"),
        (dict(s2_local=0), "model.s2_local=0 must be >= 1"),
        (dict(mixer_pattern=["s2"], s2_block=8), "model.s2_block=8 must be >= 16"),
    ],
)
def test_mixer_options_are_checked_by_their_owner(settings, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**settings)
