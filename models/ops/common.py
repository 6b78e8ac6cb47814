"""Small helpers every kernel and CP strategy shares: the accumulation dtype, the autocast
guard, the log-sum-exp merge of partial attention results, and runs of consecutive positions.

Shapes of the merge (any leading dims ``...``, e.g. [B] or none):
    o, o_i      [..., T, H, D]   partial outputs over disjoint key sets
    lse, lse_i  [..., H, T]      their log-sum-exp, -inf where a row saw no key
"""

from __future__ import annotations

import functools

import torch


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype kernels accumulate in (scores, states, merged outputs): fp64 for fp64 inputs,
    fp32 for everything else (fp32 and half precision)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def no_autocast(fn):
    """Run ``fn`` with autocast off on the device of its first argument (a tensor): the op
    chooses its own precision (fp32 accumulation, fp64 for fp64 inputs) whatever autocast
    says; under bf16 autocast its matmuls would otherwise run in bf16 and its in-place
    accumulations (baddbmm_, +=) would meet mixed dtypes."""

    @functools.wraps(fn)
    def wrapped(x, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False):
            return fn(x, *args, **kwargs)

    return wrapped


def merge_lse(o, lse, o_i, lse_i):
    """Log-sum-exp merge of two partial results over disjoint keys -> (o, lse) of the union.
    Rows that saw nothing on either side stay 0 with lse -inf (never NaN)."""
    new = torch.logaddexp(lse, lse_i)  # [..., H, T]
    safe = torch.where(torch.isinf(new), 0.0, new)
    w, w_i = torch.exp(lse - safe), torch.exp(lse_i - safe)  # 0 where lse = -inf
    o = o * w.transpose(-1, -2)[..., None] + o_i * w_i.transpose(-1, -2)[..., None]
    return o, new


def run_starts(pos: torch.Tensor, doc: torch.Tensor | None = None) -> torch.Tensor:
    """Start indices [n_runs] int64 of the maximal runs of consecutive positions in ``pos``
    [T] (inside one document when ``doc`` [T] is given); empty for T = 0."""
    if pos.shape[0] == 0:
        return pos.new_zeros(0, dtype=torch.int64)
    brk = pos[1:] != pos[:-1] + 1
    if doc is not None:
        brk = brk | (doc[1:] != doc[:-1])
    return torch.cat([pos.new_zeros(1, dtype=torch.int64), brk.nonzero().flatten() + 1])
