"""The fused-piece layer (models/ops/attention/fused.py) on its CUDA branches, run on CPU: each
CUDA kernel is replaced by a stand-in with that kernel's calling convention and limits (equal
head counts for PyTorch's CUDA ops, square causal masks, flash-attn's signatures of 2.5 and
2.6+, lse padded to 32 rows), computed by the CPU flash op; the whole kernel (span plan, merge,
backward from the merged lse) must still match the fp64 reference."""

import types

import pytest
import torch

from models.ops.attention import MaskSpec, attention_backward, attention_forward, attention_ref, fused, span_plan
from models.ops.documents import doc_ids

CPU, CPU_BWD = fused._FLASH_CPU, fused._FLASH_CPU_BWD


def _square_if_causal(q, k, causal, t_dim):
    # flash-attn aligns a non-square causal mask bottom-right, PyTorch's CUDA dispatch rejects
    # it: the wrapper must only ever hand over square causal pieces
    assert not causal or q.shape[t_dim] == k.shape[t_dim], "non-square causal piece reached a CUDA kernel"


class _Aten:
    """PyTorch's CUDA fused ops, emulated: [1, H, t, D], equal head counts."""

    def __getattr__(self, name):
        return getattr(torch.ops.aten, name)

    @staticmethod
    def _scaled_dot_product_flash_attention(q, k, v, dropout, causal, debug, scale=None):
        assert q.shape[1] == k.shape[1] and dropout == 0.0
        _square_if_causal(q, k, causal, 2)
        o, lse = CPU(q, k, v, 0.0, causal, scale=scale)
        return o, lse, None, None, q.shape[2], k.shape[2], None, None, None

    @staticmethod
    def _scaled_dot_product_flash_attention_backward(do, q, k, v, o, lse, cq, ck, mq, mk, p, causal, s, off, scale):
        assert cq is None and ck is None and (mq, mk) == (q.shape[2], k.shape[2]) and lse.shape == q.shape[:3]
        return CPU_BWD(do, q, k, v, o, lse, p, causal, scale=scale)

    @staticmethod
    def _scaled_dot_product_efficient_attention(q, k, v, bias, with_lse, dropout, causal, scale=None):
        assert q.shape[1] == k.shape[1] and bias is None and with_lse
        _square_if_causal(q, k, causal, 2)
        o, lse = CPU(q, k, v, 0.0, causal, scale=scale)
        return o, torch.nn.functional.pad(lse, (0, (-q.shape[2]) % 32)), None, None

    @staticmethod
    def _scaled_dot_product_efficient_attention_backward(do, q, k, v, bias, o, lse, s, off, p, mask, causal, scale):
        assert lse.shape[2] % 32 == 0 and lse.shape[2] >= q.shape[2] and list(mask) == [True, True, True, False]
        return (*CPU_BWD(do, q, k, v, o, lse[:, :, : q.shape[2]].contiguous(), p, causal, scale=scale), None)


def _flash_attn_v26():
    """flash-attn >= 2.6: window_size_left / _right, softcap; 4 outputs."""

    def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right,
                            softcap, alibi_slopes, return_softmax):  # fmt: skip
        assert (window_size_left, window_size_right, softcap) == (-1, -1, 0.0) and q.shape[0] == 1
        _square_if_causal(q, k, causal, 1)
        o, lse = CPU(*(x.transpose(1, 2) for x in (q, k, v)), 0.0, causal, scale=softmax_scale)
        return o.transpose(1, 2), lse, None, None

    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                             window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
                             rng_state=None):  # fmt: skip
        grads = CPU_BWD(
            *(x.transpose(1, 2) for x in (dout, q, k, v, out)), softmax_lse, 0.0, causal, scale=softmax_scale
        )
        for buf, g in zip((dq, dk, dv), grads):
            buf.copy_(g.transpose(1, 2))
        return softmax_lse

    return types.SimpleNamespace(_flash_attn_forward=_flash_attn_forward, _flash_attn_backward=_flash_attn_backward)


def _flash_attn_v25():
    """flash-attn 2.5: window_size as a pair; 8 outputs; backward returns the gradients too."""
    new = _flash_attn_v26()

    def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes, return_softmax):
        o, lse, _, _ = new._flash_attn_forward(
            q, k, v, dropout_p, softmax_scale, causal, *window_size, 0.0, None, False
        )
        return o, q, k, v, o, lse, None, None

    def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                             window_size, alibi_slopes, deterministic, rng_state=None):  # fmt: skip
        new._flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                                 *window_size, 0.0, None, False)  # fmt: skip
        return dq, dk, dv, None

    return types.SimpleNamespace(_flash_attn_forward=_flash_attn_forward, _flash_attn_backward=_flash_attn_backward)


def _case(q_pos, k_pos, cu, h=4, hkv=2, d=8):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, len(q_pos), h, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, len(k_pos), hkv, d, generator=g, dtype=torch.float64) for _ in range(2))
    do = torch.randn(q.shape, generator=g, dtype=torch.float64)
    return q, k, v, do, MaskSpec(q_pos, k_pos, doc_ids(cu, q_pos[None]), doc_ids(cu, k_pos[None]), True, None)


CASES = {
    "packed": (torch.arange(40), torch.arange(40), torch.tensor([0, 9, 40])),  # square causal pieces
    "ring step": (torch.arange(20, 40), torch.arange(10, 30), torch.tensor([0, 64])),  # full + causal
    "taller": (torch.arange(20, 40), torch.arange(20, 30), torch.tensor([0, 64])),  # causal tq > tk
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ["flash_attn_v26", "flash_attn_v25", "sdpa_flash", "sdpa_efficient"])
def test_cuda_backends_through_the_span_plan(name, case, monkeypatch):
    q, k, v, do, mask = _case(*CASES[case])
    if case == "taller":
        assert [(p.form, p.qs.stop - p.qs.start, p.ks.stop - p.ks.start) for p in span_plan(mask, 0)] == [
            ("causal", 20, 10)
        ]
    backend = name.split("_v")[0]
    monkeypatch.setattr(fused, "backend", lambda x: backend)
    monkeypatch.setattr(fused, "aten", _Aten())
    if backend == "flash_attn":
        module = _flash_attn_v26() if name.endswith("26") else _flash_attn_v25()
        monkeypatch.setattr(fused, "_flash_attn", lambda: module)
    o, lse = attention_forward(q, k, v, mask)
    grads = attention_backward(do, q, k, v, o, lse, mask)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o_r, lse_r = attention_ref(*leaves, mask)
    want = torch.autograd.grad((o_r * do).sum(), leaves)
    fin = torch.isfinite(lse_r)
    assert (o - o_r).abs().max() < 1e-10 and (lse[fin] - lse_r[fin]).abs().max() < 1e-10
    for g, w in zip(grads, want):
        assert (g - w).abs().max() < 1e-10


def test_backend_choice_on_this_machine():
    x = torch.zeros(4, 2, 8)
    assert fused.backend(x) == "cpu"
    if not torch.cuda.is_available():
        assert fused.backend(torch.zeros(4, 2, 8, device="meta")) is None  # no fused kernel: the tile loop
