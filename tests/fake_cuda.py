"""CUDA tensors on a machine without a GPU, to catch device-placement mistakes in CI.

``with fake_cuda():`` makes ``device="cuda"`` work on a CPU-only build: factories and
``.to("cuda")`` / ``.cuda()`` return ``CudaOnCpu`` tensors, which report ``device == cuda:0``
and ``is_cuda`` but hold a real CPU tensor, so the code under test computes real numbers (the
results can be compared to a reference). Every ATen op on them checks devices as CUDA does:

    allowed   CPU index tensors in indexing (``x[idx]``, ``x[idx] = v``; CUDA copies them),
              0-dim CPU tensors as scalars, cross-device ``copy_`` / ``.to`` / ``.cpu()``
    raises    any other CPU tensor meeting a CUDA one: ``masked_fill(cpu_mask)``,
              ``index_add_(0, cpu_index, ...)``, ``torch.where(cpu_cond, ...)``, matmul, ...

Unlike FakeTensorMode (which has no data: ``.tolist()`` / ``bool()`` of any tensor made inside
it fail), host-side planning code runs unchanged. ``torch.cuda.*`` calls and collectives are not
faked, and neither is autograd: recording a CUDA tensor in the graph needs the CUDA device guard,
which a CPU-only build lacks (the process aborts), so drive explicit forward / backward functions
with tensors that do not require grad. ``count_host_syncs`` counts device-to-host reads
(``.item()``, ``bool()``, ``.tolist()``, ``.cpu()``).
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

aten = torch.ops.aten

# ops where a CPU tensor may meet a CUDA one on a real GPU
_CROSS_DEVICE_OK = {
    aten.copy_.default,
    aten._to_copy.default,
    aten.index.Tensor,
    aten.index_put_.default,
    aten.index_put.default,
    aten._index_put_impl_.default,
    aten._unsafe_index.Tensor,
}
_HOST_READS = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}


_HOST_READ_FUNCS = {
    torch.Tensor.tolist,
    torch.Tensor.item,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__bool__,
    torch.Tensor.__index__,
}


class DeviceMismatch(RuntimeError):
    """A CPU tensor met a CUDA tensor in an op that CUDA rejects."""


def _is_cuda_device(d) -> bool:
    return d is not None and torch.device(d).type == "cuda"


class CudaOnCpu(torch.Tensor):
    """A tensor that says it lives on cuda:0; its data is the CPU tensor ``_data``."""

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(
            cls,
            data.shape,
            strides=data.stride(),
            storage_offset=data.storage_offset(),
            dtype=data.dtype,
            device=torch.device("cuda", 0),
            requires_grad=False,  # autograd on a CUDA tensor needs the CUDA device guard: see the docstring
        )
        r._data = data
        return r

    def __repr__(self):
        return f"CudaOnCpu({self._data!r})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__:
            return _getitem(*args)
        if func is torch.Tensor.__setitem__:
            return _setitem(*args)
        if func in _HOST_READ_FUNCS:  # the value goes to Python: a device-to-host copy on a GPU
            _count_host_read()
            return func(args[0]._data, *args[1:], **kwargs)
        if func is torch.Tensor.copy_:  # its Python binding takes a device guard too
            return aten.copy_.default(*args, **kwargs)
        if func is torch.where and len(args) == 3:  # the binding makes CUDA scalar tensors of numbers
            like = next(a for a in args[1:] if isinstance(a, torch.Tensor))
            num = lambda a: a if isinstance(a, torch.Tensor) else torch.tensor(a, dtype=like.dtype)
            args = (args[0], num(args[1]), num(args[2]))
        if func is torch.Tensor.numpy:
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first.")
        try:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        except RuntimeError as e:  # some Python bindings (operators such as ~) take a device guard
            if "not linked with support for cuda" not in str(e):
                raise
        return _run_unwrapped(func, args, kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if func not in _CROSS_DEVICE_OK:
            _check_devices(func, flat)
        if func in _HOST_READS:
            _count_host_read()
        target = kwargs.get("device")
        if target is not None:
            kwargs = dict(kwargs, device=torch.device("cpu"))
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if func is aten._to_copy.default and target is not None and not _is_cuda_device(target):
            _count_host_read()
            return out  # .cpu() / .to("cpu"): a plain tensor
        if func is aten.copy_.default and not isinstance(args[0], CudaOnCpu):
            if isinstance(args[1], CudaOnCpu):
                _count_host_read()
            return args[0]
        if func._schema.is_mutable and isinstance(args[0], CudaOnCpu):
            return args[0]
        return tree_map(_wrap, out)


def _check_devices(func, tensors):
    cpu = [a for a in tensors if not isinstance(a, CudaOnCpu) and a.device.type == "cpu" and a.dim() > 0]
    if cpu:
        raise DeviceMismatch(
            f"{func}: expected all tensors to be on the same device, but found cuda:0 and cpu "
            f"(a CPU tensor of shape {list(cpu[0].shape)})"
        )


def _run_unwrapped(func, args, kwargs):
    """Run a Python-level function on the CPU data (after the device check); in-place results
    come back as the CudaOnCpu argument they mutated."""
    _check_devices(func, [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)])
    out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
    if isinstance(args[0], CudaOnCpu) and out is args[0]._data:
        return args[0]
    return tree_map(_wrap, out)


def _unwrap(x):
    return x._data if isinstance(x, CudaOnCpu) else x


def _wrap(x):
    return CudaOnCpu(x) if isinstance(x, torch.Tensor) and not isinstance(x, CudaOnCpu) else x


# ----------------------------------------------------------------------------- indexing
# Python indexing of a tensor takes a device guard before dispatch, which a CPU-only build
# lacks for CUDA; rebuild it from ATen ops (select, slice, unsqueeze, index, index_put_).
def _basic(x, idx):
    """Apply ints, slices, None and Ellipsis; returns (view, [advanced index or None per dim])."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis and not _is_bool_tensor(i))
    n_real += sum(i.dim() for i in idx if _is_bool_tensor(i))
    out, dim, adv = x, 0, []
    for i in idx:
        if i is Ellipsis:
            skip = x.dim() - n_real
            dim += skip
            adv += [None] * skip
        elif i is None:
            out = out.unsqueeze(dim)
            dim += 1
            adv.append(None)
        elif isinstance(i, bool):
            raise NotImplementedError("fake_cuda: bool scalar index")
        elif isinstance(i, int) or (isinstance(i, torch.Tensor) and i.dim() == 0 and not i.is_floating_point()):
            out = out.select(dim, int(i))
        elif isinstance(i, slice):
            start, stop, step = i.indices(out.shape[dim])
            out = aten.slice.Tensor(out, dim, start, max(start, stop), step)
            dim += 1
            adv.append(None)
        else:
            t = torch.as_tensor(i) if not isinstance(i, torch.Tensor) else i
            adv.append(t)
            dim += t.dim() if t.dtype == torch.bool else 1
    return out, adv


def _is_bool_tensor(i) -> bool:
    return isinstance(i, torch.Tensor) and i.dtype == torch.bool


def _trim(adv):
    while adv and adv[-1] is None:
        adv.pop()
    return adv


def _getitem(x, idx):
    out, adv = _basic(x, idx)
    adv = _trim(adv)
    return aten.index.Tensor(out, adv) if adv else out


def _setitem(x, idx, value):
    out, adv = _basic(x, idx)
    adv = _trim(adv)
    if not isinstance(value, torch.Tensor):
        value = torch.tensor(value, dtype=x.dtype)
    if adv:
        aten.index_put_(out, adv, value)
    else:
        out.copy_(value)


# ----------------------------------------------------------------------------- the mode
class _FactoryMode(TorchFunctionMode):
    """Turns ``device="cuda"`` in factories and ``.to`` / ``.cuda()`` into CudaOnCpu results
    (a CPU-only build would fail in the Python binding, before any dispatch)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return _wrap(_unwrap(args[0]).clone()) if not isinstance(args[0], CudaOnCpu) else args[0]
        if func is torch.Tensor.to and not isinstance(args[0], CudaOnCpu):
            dev = kwargs.get("device", args[1] if len(args) > 1 else None)
            if isinstance(dev, (str, torch.device)) and _is_cuda_device(dev):
                rest = {k: v for k, v in kwargs.items() if k not in ("device", "non_blocking", "copy")}
                dtype = args[2] if len(args) > 2 else rest.pop("dtype", None)
                return _wrap(args[0].to(dtype=dtype or args[0].dtype, copy=True))
            if isinstance(dev, torch.Tensor) and isinstance(dev, CudaOnCpu):  # .to(other_tensor)
                return _wrap(args[0].to(dtype=dev.dtype, copy=True))
        if _is_cuda_device(kwargs.get("device")) and not any(isinstance(a, CudaOnCpu) for a in args):
            return _wrap(func(*args, **dict(kwargs, device="cpu")))
        return func(*args, **kwargs)


_host_reads: list[int] = []


def _count_host_read():
    if _host_reads:
        _host_reads[-1] += 1


@contextlib.contextmanager
def fake_cuda():
    """Inside: ``device="cuda"`` creates CudaOnCpu tensors (see the module docstring)."""
    with _FactoryMode():
        yield


@contextlib.contextmanager
def count_host_syncs():
    """Counts device-to-host reads of CudaOnCpu data inside; yields a one-item list."""
    _host_reads.append(0)
    box = [0]
    try:
        yield box
    finally:
        box[0] = _host_reads.pop()


def cuda(x: torch.Tensor) -> CudaOnCpu:
    """A CPU tensor as a CudaOnCpu copy (outside the mode too)."""
    return CudaOnCpu(x.detach().clone())


def cpu(x: torch.Tensor) -> torch.Tensor:
    """The data of a CudaOnCpu tensor as a plain CPU tensor (a copy)."""
    return x._data.clone() if isinstance(x, CudaOnCpu) else x
