"""The chunked loss head (models/ops/cross_entropy.py) against the unchunked reference: exact in
fp64 (loss, gradients of the hidden states and of lm_head), ignored labels, ragged chunks, tied
embeddings through the model, the bf16 autocast path, and the memory it saves."""

import pytest
import torch

from models import ModelConfig, Transformer
from models.ops.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from trainer.parallelize import apply_loss_head


def _inputs(n=37, dim=16, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, dim, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, dim, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::5] = -100  # ignored tokens, the first among them
    return h, w, labels


def _loss_and_grads(chunk, h, w, labels, scale=1.7):
    loss = linear_cross_entropy(h, w, labels, chunk=chunk)
    return [loss.detach()] + list(torch.autograd.grad(loss * scale, [h, w]))  # a non-unit upstream grad


@pytest.mark.parametrize("chunk", [1, 8, 36, 37, 100])  # 8 and 36 leave a ragged last chunk
def test_chunked_matches_unchunked_fp64(chunk):
    h, w, labels = _inputs()
    want = _loss_and_grads(0, h, w, labels)
    got = _loss_and_grads(chunk, h, w, labels)
    for a, b in zip(got, want):  # loss, d hidden states, d lm_head
        assert (a - b).abs().max() < 1e-10


def test_reference_is_cross_entropy_over_labelled_tokens():
    h, w, labels = _inputs()
    keep = labels != -100
    logits = h @ w.T
    manual = (logits.logsumexp(-1) - logits.gather(1, labels.clamp(min=0)[:, None])[:, 0])[keep].sum()
    assert (linear_cross_entropy_ref(h, w, labels) - manual).abs() < 1e-10
    all_ignored = torch.full_like(labels, -100)
    assert _loss_and_grads(8, h, w, all_ignored)[0] == 0
    assert all(g.abs().max() == 0 for g in _loss_and_grads(8, h, w, all_ignored)[1:])


def test_negative_chunk_is_refused():
    h, w, labels = _inputs()
    with pytest.raises(ValueError, match="trainer.loss_chunk_tokens"):
        linear_cross_entropy(h, w, labels, chunk=-1)


@pytest.mark.parametrize("tied", [True, False])
def test_model_loss_with_chunks_is_exact(tied):
    """Through the model: every parameter's gradient (the final norm's too), tied embeddings
    included (the head's gradient adds to the embedding's)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=tied)
    model = Transformer(cfg).double()
    ids = torch.randint(0, 97, (2, 21))
    labels = torch.randint(0, 97, (2, 21))
    labels[:, -1] = -100
    out = []
    for chunk in (0, 10):  # 42 tokens: chunks of 10, 10, 10, 10, 2
        apply_loss_head(model, chunk)
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=labels)
        loss.backward()
        out.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = out
    logits = model(ids)  # the logits path is the same computation
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    assert (l0 - ref).abs() < 1e-10 and (l1 - l0).abs() < 1e-10
    assert set(g0) == set(g1) and ("lm_head.weight" in g0) != tied
    for name in g0:
        assert (g0[name] - g1[name]).abs().max() < 1e-10, name


def test_bf16_autocast_path_runs_close_to_unchunked():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2))
    ids, labels = torch.randint(0, 300, (2, 50)), torch.randint(0, 300, (2, 50))
    out = []
    for chunk in (0, 16):
        apply_loss_head(model, chunk)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=labels)
        loss.backward()
        out.append((loss.detach(), [p.grad for p in model.parameters()]))
    (l0, g0), (l1, g1) = out
    assert l1.dtype == torch.float32 and (l1 - l0).abs() < 1e-3 * l0.abs()
    for a, b in zip(g0, g1):
        assert (a - b).abs().max() <= 2e-2 * a.abs().max() + 1e-6


def _saved_bytes(fn) -> int:
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_chunks_save_no_logits_for_backward():
    """Unchunked, autograd keeps the [N, V] fp32 log-softmax; chunked, only the hidden states,
    the weight, the labels and the per-token lse."""
    n, dim, vocab = 256, 32, 4000
    h = torch.randn(n, dim, requires_grad=True)
    w = torch.randn(vocab, dim, requires_grad=True)
    labels = torch.randint(0, vocab, (n,))
    full = _saved_bytes(lambda: linear_cross_entropy(h, w, labels))
    chunked = _saved_bytes(lambda: linear_cross_entropy(h, w, labels, chunk=64))
    assert full >= n * vocab * 4
    assert chunked <= h.nbytes + w.nbytes + labels.nbytes + n * 4  # + lse
