"""Dispatch to flash-linear-attention's Triton kernels (CUDA only; untested on CPU machines).

Argument mapping (fla >= 0.2, layout [B, T, H, D], ``head_first`` removed):
    g = gk = None        -> fla.ops.simple_gla.chunk_simple_gla(q, k, v, g=None, ...)
    g only               -> chunk_simple_gla(q, k, v, g=g, ...)                  g [B, T, H]
    gk (and maybe g)     -> fla.ops.gla.chunk_gla(q, k, v, g=gk + g[..., None], ...)
    scale                -> scale= (always explicit: fla's default is Dk ** -0.5)
    cu_seqlens           -> fla wants B = 1: q, k, v, g are flattened to [1, B*T, ...] and
                            cu_seqlens (int64) goes on the device, with its host copy as
                            cu_seqlens_cpu where fla takes it (no device-to-host read)
    initial_state [B,..] -> fla's is per *document* [N, H, Dk, Dv]: row b's state goes to the
                            document holding token b*T, all other documents start from 0
    final_state          -> fla returns one per document; row b's is that of token (b+1)*T - 1
fla's chunk size is its own (64); both kernels include the diagonal (token t sees itself).
"""

from __future__ import annotations

import importlib.util
import os

import torch


def available() -> bool:
    return importlib.util.find_spec("fla") is not None


def torch_reference(module: str, name: str):
    """``name`` from fla's plain-torch reference file ``fla/ops/<module>/naive.py`` (e.g.
    ``("simple_gla", "naive_chunk_simple_gla")``), loaded by path: importing the ``fla`` package
    needs triton, the reference files only torch and einops. None when fla(-core) or einops is
    not installed. For tests and benchmarks."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "ops", module, "naive.py")
    if not os.path.exists(path):
        return None
    file_spec = importlib.util.spec_from_file_location(f"_fla_naive_{module}", path)
    mod = importlib.util.module_from_spec(file_spec)
    try:
        file_spec.loader.exec_module(mod)
    except ImportError:  # einops missing
        return None
    return getattr(mod, name, None)


def fla_linear_attention(q, k, v, g, gk, scale, initial_state, cu_seqlens, output_final_state):
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":  # Triton's CPU interpreter: the tests
        raise RuntimeError("the fla kernels run on CUDA tensors only: use impl='chunk' (model.linear_impl=chunk)")
    from fla.ops.gla import chunk_gla
    from fla.ops.simple_gla import chunk_simple_gla

    bsz, t = q.shape[:2]
    fn, decay = chunk_simple_gla, g
    if gk is not None:
        fn, decay = chunk_gla, (gk if g is None else gk + g[..., None])
    if cu_seqlens is None:
        o, ht = fn(q, k, v, g=decay, scale=scale, initial_state=initial_state, output_final_state=output_final_state)
        return o, ht
    # row bookkeeping on the host copy; fla gets both copies (cu_seqlens_cpu spares it a sync)
    cu_cpu = cu_seqlens.to("cpu", torch.int64)
    cu = cu_cpu.to(q.device, non_blocking=True)
    row_first = torch.searchsorted(cu_cpu, torch.arange(bsz) * t, right=True) - 1
    row_last = torch.searchsorted(cu_cpu, torch.arange(1, bsz + 1) * t - 1, right=True) - 1
    h0 = None
    if initial_state is not None:
        h0 = initial_state.new_zeros(len(cu_cpu) - 1, *initial_state.shape[1:])
        h0 = h0.index_copy(0, row_first.to(q.device), initial_state)
    flat = [x.reshape(1, bsz * t, *x.shape[2:]) if x is not None else None for x in (q, k, v, decay)]
    kw = {"cu_seqlens_cpu": cu_cpu} if _takes_cu_seqlens_cpu(fn) else {}
    o, ht = fn(
        *flat[:3], g=flat[3], scale=scale, initial_state=h0, output_final_state=output_final_state, cu_seqlens=cu, **kw
    )
    o = o.reshape(bsz, t, *o.shape[2:])
    return o, (ht[row_last.to(q.device)] if output_final_state else None)


def _takes_cu_seqlens_cpu(fn) -> bool:
    """fla >= 0.4 takes the host copy of cu_seqlens (else it reads the device one back)."""
    import inspect

    return "cu_seqlens_cpu" in inspect.signature(fn).parameters
