"""CUDA device placement of the S2 paths, checked without a GPU: PyTorch's FakeTensorMode makes
tensors on device "cuda" on a CPU-only machine, and a CPU tensor meeting one fails as on a GPU.
The pattern kernel (forward and backward, masked tiles, documents, a chunk meeting keys from
elsewhere) builds its masks and indices on q's device; the s2 strategy's backward adds returned
gradients with its (CPU) send plan moved to the gradient's device. Each check is shown to bite on
the CPU-placed form."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode

from models.ops.attention import MaskSpec, attention_backward, attention_forward
from models.ops.attention.pattern import plan_of
from models.ops.documents import doc_ids
from models.s2_pattern import s2_pattern
from parallel.strategies.s2 import add_returned


def _mask(window):
    """Queries of two runs (a zigzag-like chunk) against keys from elsewhere, packed documents."""
    pattern = s2_pattern(block=16, stride=2, local=1, n_kv_heads=2, n_heads=4, check_coverage=False)
    cu = torch.tensor([0, 37, 100, 160])
    q_pos = torch.cat([torch.arange(20, 60), torch.arange(110, 140)])
    k_pos = torch.arange(0, 130)
    q_doc, k_doc = doc_ids(cu, q_pos)[None], doc_ids(cu, k_pos)[None]
    return MaskSpec(q_pos, k_pos, q_doc, k_doc, True, window, pattern.bind(cu, 1, 160))


@pytest.mark.parametrize("window", [None, 23])
def test_pattern_kernel_runs_on_fake_cuda(window):
    mask = _mask(window)
    plan_of(mask, 2, "cpu", fused=False)  # the plan from the mask's metadata (real CPU work, once per mask)
    with FakeTensorMode(allow_non_fake_inputs=True):
        q = torch.empty(1, 70, 4, 8, device="cuda")
        k, v = (torch.empty(1, 130, 2, 8, device="cuda") for _ in "kv")
        o, lse = attention_forward(q, k, v, mask, None, 16)
        dq, dk, dv = attention_backward(torch.empty_like(o), q, k, v, o, lse, mask, None, 16)
        assert all(x.device.type == "cuda" for x in (o, lse, dq, dk, dv))
        assert dk.shape == k.shape and dq.shape == q.shape


def test_the_plan_places_masks_and_indices_on_q_device_and_the_check_bites():
    mask = _mask(23)
    plan_of(mask, 2, "cpu", fused=False)
    with FakeTensorMode(allow_non_fake_inputs=True):
        scores = torch.empty(70, 130, device="cuda")
        grad = torch.empty(130, 2, 8, device="cuda")
        for device, fails in (("cuda:0", False), ("cpu", True)):  # "cpu": the placement before the fix
            plan = plan_of(mask, 2, torch.device(device), fused=False)
            cut = [it for row in plan.rows for items in row for it in items if it[3] is not None]
            full = [it for row in plan.rows for items in row for it in items if it[1] is not None]
            assert cut and full
            for _, kfull, _, kcut, allowed in cut[:2] + full[:2]:
                index = kfull if kfull is not None else kcut
                src = torch.empty(len(index), 2, 8, device="cuda")
                _check(fails, grad.index_add_, 0, index, src)
                if allowed is not None:
                    tile = scores.narrow(0, 0, allowed.shape[0]).narrow(1, 0, allowed.shape[1])
                    _check(fails, tile.masked_fill, torch.logical_not(allowed), 0.0)


def _check(fails: bool, op, *args):
    """Run ``op(*args)``: it must raise a device mismatch when ``fails``, else succeed."""
    if fails:
        with pytest.raises((FakeTensorDeviceMismatchError, RuntimeError), match="device"):
            op(*args)
    else:
        op(*args)


def test_s2_backward_adds_returned_gradients_on_the_gradient_device():
    index = torch.tensor([0, 3, 4])  # the send plan: CPU, as every rank computes it
    with FakeTensorMode(allow_non_fake_inputs=True):
        grad = torch.zeros(2, 1, 8, 4, 16, device="cuda")
        part = torch.empty(2, 1, 3, 2, 16, device="cuda")
        add_returned(grad, slice(2, 4), index, part)
        with pytest.raises(RuntimeError, match="same device"):  # the form before the fix
            grad.narrow(3, 2, 2).index_add_(2, index, part)
