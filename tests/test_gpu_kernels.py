"""GPU-only paths (flash-attn). Skipped cleanly without CUDA or flash-attn."""

import pytest
import torch

from models.ops import flash
from models.ops.attention import MaskSpec, attention, attention_ref
from models.ops.documents import doc_ids

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not flash.available(), reason="needs CUDA and flash-attn")]


@pytest.mark.parametrize("window", [None, 64])
def test_flash_path_matches_fp64_reference(window):
    torch.manual_seed(0)
    b, t, h, hkv, d = 2, 1000, 8, 2, 64
    cu = torch.tensor([0, 1, 300, 999, 1000, 1700, 2000])
    pos = torch.arange(t)
    doc = doc_ids(cu, torch.arange(b)[:, None] * t + pos[None])
    mask = MaskSpec(pos, pos, doc, doc, True, window)
    q, k, v = (torch.randn(b, t, n, d, device="cuda") for n in (h, hkv, hkv))
    ref, _ = attention_ref(q.double().cpu(), k.double().cpu(), v.double().cpu(), mask)
    assert flash.applicable(q.bfloat16(), mask)
    out, lse = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    torch_path, _ = attention_ref(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    err_flash = (out.double().cpu() - ref).abs().max()
    err_bf16 = (torch_path.double().cpu() - ref).abs().max()
    assert err_flash <= 2 * err_bf16 + 1e-3
