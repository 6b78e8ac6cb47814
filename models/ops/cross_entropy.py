"""The loss head: lm_head -> next-token cross-entropy, whole or in token chunks.

Shapes:
    h        [N, dim]   final hidden states (after the final norm), the flattened [B, T] tokens
    weight   [V, dim]   lm_head (or the tied embedding)
    labels   [N] int64  target of each token; ``ignore_index`` (-100): no loss
    returns  []         cross-entropy summed over the labelled tokens, fp32 (fp64 for fp64 h)

``linear_cross_entropy_ref`` is the plain computation through autograd: logits [N, V] in the
matmul's dtype, upcast, ``F.cross_entropy``. Autograd then keeps the logits' log-softmax [N, V]
(fp32) for backward and materialises the logits' gradient [N, V]; at a long row that is more
than the model (one 128K row x 128K vocabulary: 64 GiB of fp32 log-softmax).

``linear_cross_entropy(..., chunk=C)`` gives the same value and gradients without ever holding
[N, V]: forward runs C tokens at a time under no_grad and keeps only the log-sum-exp of each
token ([N], fp32) besides its inputs; backward recomputes each chunk's logits, forms
``dlogits = (softmax - onehot(label)) * g`` from the saved lse, and accumulates
``dW += dlogits^T h_c``, ``dh_c = dlogits W``. Extra memory: one chunk of logits and its
gradient ([C, V]); extra time: the chunk's logits matmul once more (recompute). The autocast
state of forward is re-entered in backward, so the recomputed logits are the forward's, bit for
bit.

The final norm stays outside (the model calls its module): engines that gather a module's
parameters around that module's own forward and backward (DeepSpeed ZeRO-3) see it run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.ops.common import acc_dtype

IGNORE_INDEX = -100


def linear_cross_entropy_ref(h, weight, labels, *, ignore_index=IGNORE_INDEX):
    """Unchunked: full logits [N, V] through autograd (the reference; ``chunk=0``)."""
    logits = F.linear(h, weight)
    return F.cross_entropy(logits.to(acc_dtype(h)), labels, ignore_index=ignore_index, reduction="sum")


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(fctx, h, weight, labels, chunk, ignore_index):
        acc, dev = acc_dtype(h), h.device.type
        lse = torch.empty(h.shape[0], dtype=acc, device=h.device)
        total = torch.zeros((), dtype=acc, device=h.device)
        for s in range(0, h.shape[0], chunk):
            rows = slice(s, s + chunk)
            logits = F.linear(h[rows], weight).to(acc)  # [c, V]
            lse[rows] = logits.logsumexp(-1)
            lab = labels[rows]
            target = logits.gather(1, lab.clamp(min=0)[:, None])[:, 0]
            total += torch.where(lab != ignore_index, lse[rows] - target, 0.0).sum()
        fctx.save_for_backward(h, weight, labels, lse)
        fctx.chunk, fctx.ignore_index = chunk, ignore_index
        fctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        return total

    @staticmethod
    def backward(fctx, g):
        h, weight, labels, lse = fctx.saved_tensors
        need_h, need_w = fctx.needs_input_grad[:2]
        acc = lse.dtype
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        enabled, dtype = fctx.autocast
        with torch.autocast(h.device.type, dtype=dtype, enabled=enabled):  # the forward's precision
            for s in range(0, h.shape[0], fctx.chunk):
                rows = slice(s, s + fctx.chunk)
                logits = F.linear(h[rows], weight)  # [c, V], recomputed
                compute = logits.dtype
                p = logits.to(acc).sub_(lse[rows, None]).exp_()  # softmax, in place when logits are acc
                del logits
                lab = labels[rows]
                p[torch.arange(p.shape[0], device=p.device), lab.clamp(min=0)] -= 1.0
                p *= torch.where(lab != fctx.ignore_index, g, 0.0).to(acc)[:, None]
                dlogits = p.to(compute)
                del p
                if need_w:
                    dw += torch.matmul(dlogits.t(), h[rows])
                if need_h:
                    dh[rows] = torch.matmul(dlogits, weight)
        return dh, None if dw is None else dw.to(weight.dtype), None, None, None


def linear_cross_entropy(h, weight, labels, *, chunk: int = 0, ignore_index=IGNORE_INDEX) -> torch.Tensor:
    """Summed cross-entropy of ``h @ weight.T`` against ``labels``; ``chunk`` > 0 computes it
    ``chunk`` tokens at a time without [N, V] logits (exact, recomputing logits in backward),
    0 through the reference (full logits). Shapes in the module docstring."""
    if chunk < 0:
        raise ValueError(f"loss chunk={chunk} must be >= 0 tokens (0: full logits; trainer.loss_chunk_tokens)")
    if chunk == 0:
        return linear_cross_entropy_ref(h, weight, labels, ignore_index=ignore_index)
    return _ChunkedLinearCrossEntropy.apply(h, weight, labels, chunk, ignore_index)
