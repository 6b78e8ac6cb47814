"""Fused dense attention of one piece, with its log-sum-exp, on every device: the forward, and a
backward that takes the (possibly merged) output and lse, so a CP strategy gets each key
chunk's exact share of the gradients from a fused kernel (the trick dense.py relies on).

Shapes (one piece, no batch dim):
    qt            [tq, H, D]
    kt, vt        [tk, Hkv, D]      H % Hkv == 0 (GQA)
    o, do         [tq, H, D]
    lse           [H, tq]           fp32 (fp64 for fp64 CPU inputs)
``causal``: key j is allowed for query i iff j <= i, top-left aligned (the span plan's
"causal" piece: both sides start at the same position; tq >= tk).

Backends, by device and dtype (``backend``):
    cpu             aten._scaled_dot_product_flash_attention_for_cpu (+ _backward): any float dtype
    flash_attn      flash-attn 2's _flash_attn_forward / _flash_attn_backward (fp16 / bf16,
                    compute capability >= 8.0, head_dim <= 256 and a multiple of 8), GQA native
    sdpa_flash      aten._scaled_dot_product_flash_attention (+ _backward) without flash-attn
    sdpa_efficient  aten._scaled_dot_product_efficient_attention (+ _backward): fp32 on CUDA
    None            no fused kernel (fp64 on CUDA, large heads, old GPUs): dense.py's tile loop
On CUDA a causal piece that is not square runs as a causal square plus a full rectangle
(flash-attn aligns a non-square causal mask bottom-right). The CUDA backends take half
precision as it is: no fp32 copies of q, k, v.
"""

from __future__ import annotations

import functools
import inspect

import torch

aten = torch.ops.aten
_FLASH_CPU = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BWD = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
MAX_HEAD_DIM = 256  # flash-attn 2 and PyTorch's flash kernel


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def _flash_attn():
    """flash-attn's interface module, or None when it is not installed."""
    try:
        from flash_attn import flash_attn_interface
    except ImportError:
        return None
    return flash_attn_interface


def backend(x: torch.Tensor) -> str | None:
    """The fused kernel pieces of ``x`` [t, H, D] (its device, dtype, head dim) run in, or None."""
    if x.device.type == "cpu":
        return "cpu" if _FLASH_CPU is not None else None
    if x.device.type != "cuda" or not torch.cuda.is_available():
        return None
    d = x.shape[-1]
    if d > MAX_HEAD_DIM or d % 8:
        return None
    if x.dtype in (torch.float16, torch.bfloat16):
        if _capability(x.device.index if x.device.index is not None else torch.cuda.current_device()) < (8, 0):
            return None
        return "flash_attn" if _flash_attn() is not None else "sdpa_flash"
    if x.dtype == torch.float32:
        return "sdpa_efficient"
    return None


def supports(x: torch.Tensor) -> bool:
    return backend(x) is not None


def piece_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a CP strategy hands its partial attention pieces in: half precision stays half
    on CUDA where a fused kernel takes it (flash-attn accumulates in fp32 and returns an fp32
    lse; upcasting would force the fp32 path), everything else the accumulation dtype."""
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and supports(x):
        return x.dtype
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[t, H, D] -> [1, H, t, D] view, the layout of PyTorch's fused ops."""
    return x.transpose(0, 1)[None]


def _tokens_first(x: torch.Tensor) -> torch.Tensor:
    """[1, H, t, D] -> [t, H, D]."""
    return x[0].transpose(0, 1)


# ----------------------------------------------------------------------------- forward
def fused_forward(qt, kt, vt, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [tq, H, D] in q's dtype, lse [H, tq]) of one piece in its backend's fused kernel."""
    name = backend(qt)
    if name == "cpu":
        o, lse = _FLASH_CPU(_heads_first(qt), _heads_first(kt), _heads_first(vt), 0.0, causal, scale=scale)
        return _tokens_first(o), lse[0]
    if name is None:
        raise ValueError(f"no fused attention kernel for {qt.dtype} on {qt.device} (head dim {qt.shape[-1]})")
    return _split_causal_forward(_CUDA_FORWARD[name], qt, kt, vt, causal, scale)


def _split_causal_forward(fwd, qt, kt, vt, causal, scale):
    """Square causal part + full rectangle below it (rows tk.. see every key), disjoint rows."""
    tq, tk = qt.shape[0], kt.shape[0]
    if not causal or tq == tk:
        return fwd(qt, kt, vt, causal, scale)
    n = min(tq, tk)  # keys past tq are never seen (top-left)
    o, lse = fwd(qt[:n], kt[:n], vt[:n], True, scale)
    if tq == n:
        return o, lse
    o2, lse2 = fwd(qt[n:], kt, vt, False, scale)
    return torch.cat([o, o2]), torch.cat([lse, lse2], dim=1)


def _flash_attn_call(fn, **values):
    """Call a flash-attn internal by parameter name: its positional signature changed across
    2.x releases (window_size -> window_size_left / _right, softcap added)."""
    params = inspect.signature(getattr(fn, "_init_fn", fn)).parameters
    defaults = {
        "window_size": (-1, -1),
        "window_size_left": -1,
        "window_size_right": -1,
        "softcap": 0.0,
        "alibi_slopes": None,
        "return_softmax": False,
        "deterministic": False,
        "rng_state": None,
    }
    args = []
    for name, p in params.items():
        if name in values:
            args.append(values[name])
        elif name in defaults:
            args.append(defaults[name])
        elif p.default is not inspect.Parameter.empty:
            break  # the rest keep their defaults
        else:
            raise TypeError(f"flash-attn's {fn.__name__} takes an unknown argument {name!r}")
    return fn(*args)


def _flash_attn_forward(qt, kt, vt, causal, scale):
    fa = _flash_attn()
    out = _flash_attn_call(
        fa._flash_attn_forward, q=qt[None], k=kt[None], v=vt[None], dropout_p=0.0, softmax_scale=scale, causal=causal
    )
    # (out, lse, S_dmask, rng_state) since 2.6; (out, q, k, v, out_padded, lse, S_dmask, rng_state) before
    return out[0][0], out[-3][0]


def _expand_kv(kt, h):
    """[tk, Hkv, D] -> [tk, H, D]: PyTorch's fused CUDA ops take equal head counts."""
    g = h // kt.shape[1]
    return kt if g == 1 else kt.repeat_interleave(g, dim=1)


def _sdpa_flash_forward(qt, kt, vt, causal, scale):
    h = qt.shape[1]
    q4, k4, v4 = (_heads_first(x) for x in (qt, _expand_kv(kt, h), _expand_kv(vt, h)))
    o, lse = aten._scaled_dot_product_flash_attention(q4, k4, v4, 0.0, causal, False, scale=scale)[:2]
    return _tokens_first(o), lse[0]


def _sdpa_efficient_forward(qt, kt, vt, causal, scale):
    h, tq = qt.shape[1], qt.shape[0]
    q4, k4, v4 = (_heads_first(x) for x in (qt, _expand_kv(kt, h), _expand_kv(vt, h)))
    o, lse = aten._scaled_dot_product_efficient_attention(q4, k4, v4, None, True, 0.0, causal, scale=scale)[:2]
    return _tokens_first(o), lse[0, :, :tq]  # lse is padded to a multiple of 32 rows


_CUDA_FORWARD = {
    "flash_attn": _flash_attn_forward,
    "sdpa_flash": _sdpa_flash_forward,
    "sdpa_efficient": _sdpa_efficient_forward,
}


# ----------------------------------------------------------------------------- backward
def fused_backward(dot, qt, kt, vt, ot, lse, causal: bool, scale: float):
    """(dq [tq, H, D], dk, dv [tk, Hkv, D]) of one piece from the given (merged) ``ot`` and
    ``lse`` [H, tq]: with several pieces on the same rows, each piece's exact share."""
    name = backend(qt)
    if name == "cpu":
        lse_t = lse[None]
        dq, dk, dv = _FLASH_CPU_BWD(*(_heads_first(x) for x in (dot, qt, kt, vt, ot)), lse_t, 0.0, causal, scale=scale)
        return _tokens_first(dq), _tokens_first(dk), _tokens_first(dv)
    if name is None:
        raise ValueError(f"no fused attention kernel for {qt.dtype} on {qt.device} (head dim {qt.shape[-1]})")
    bwd = _CUDA_BACKWARD[name]
    lse = lse.contiguous()  # fp32: the accumulation dtype of half and fp32 inputs
    tq, tk = qt.shape[0], kt.shape[0]
    if not causal or tq == tk:
        return bwd(dot, qt, kt, vt, ot, lse, causal, scale)
    n = min(tq, tk)
    dq, dk, dv = bwd(dot[:n], qt[:n], kt[:n], vt[:n], ot[:n], lse[:, :n].contiguous(), True, scale)
    if n < tk:  # keys never seen
        pad = kt.new_zeros(tk - n, *kt.shape[1:])
        dk, dv = torch.cat([dk, pad]), torch.cat([dv, pad])
    if n == tq:
        return dq, dk, dv
    dq2, dk2, dv2 = bwd(dot[n:], qt[n:], kt, vt, ot[n:], lse[:, n:].contiguous(), False, scale)
    return torch.cat([dq, dq2]), dk + dk2, dv + dv2


def _flash_attn_backward(dot, qt, kt, vt, ot, lse, causal, scale):
    fa = _flash_attn()
    q, k, v, o, do = (x[None].contiguous() for x in (qt, kt, vt, ot, dot))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _flash_attn_call(
        fa._flash_attn_backward,
        dout=do,
        q=q,
        k=k,
        v=v,
        out=o,
        softmax_lse=lse[None],
        dq=dq,
        dk=dk,
        dv=dv,
        dropout_p=0.0,
        softmax_scale=scale,
        causal=causal,
    )
    return dq[0], dk[0], dv[0]


def _sum_groups(dk4, hkv):
    """[1, H, tk, D] gradients of expanded K/V -> [tk, Hkv, D]."""
    _, h, tk, d = dk4.shape
    g = _tokens_first(dk4)
    return g if h == hkv else g.view(tk, hkv, h // hkv, d).sum(2)


def _sdpa_flash_backward(dot, qt, kt, vt, ot, lse, causal, scale):
    h, hkv, tq, tk = qt.shape[1], kt.shape[1], qt.shape[0], kt.shape[0]
    q4, k4, v4 = (_heads_first(x) for x in (qt, _expand_kv(kt, h), _expand_kv(vt, h)))
    # no dropout: the rng state is never read; cum_seq None: not a nested (varlen) batch
    rng = torch.zeros(2, dtype=torch.int64, device=qt.device)
    dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
        _heads_first(dot),
        q4,
        k4,
        v4,
        _heads_first(ot),
        lse[None],
        None,
        None,
        tq,
        tk,
        0.0,
        causal,
        rng,
        rng,
        scale=scale,
    )
    return _tokens_first(dq), _sum_groups(dk, hkv), _sum_groups(dv, hkv)


def _sdpa_efficient_backward(dot, qt, kt, vt, ot, lse, causal, scale):
    h, hkv, tq = qt.shape[1], kt.shape[1], qt.shape[0]
    q4, k4, v4 = (_heads_first(x) for x in (qt, _expand_kv(kt, h), _expand_kv(vt, h)))
    pad = (-tq) % 32  # the forward's lse layout: rows padded to a multiple of 32
    lse_p = torch.nn.functional.pad(lse, (0, pad))[None].contiguous()
    rng = torch.zeros((), dtype=torch.int64, device=qt.device)
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        _heads_first(dot),
        q4,
        k4,
        v4,
        None,
        _heads_first(ot),
        lse_p,
        rng,
        rng,
        0.0,
        [True, True, True, False],
        causal,
        scale=scale,
    )
    return _tokens_first(dq), _sum_groups(dk, hkv), _sum_groups(dv, hkv)


_CUDA_BACKWARD = {
    "flash_attn": _flash_attn_backward,
    "sdpa_flash": _sdpa_flash_backward,
    "sdpa_efficient": _sdpa_efficient_backward,
}
