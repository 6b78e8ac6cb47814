"""Run Triton kernels (fla's) on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``).

Call ``enable()`` before anything imports triton or fla: the variable is read when a kernel is
decorated. Three narrow shims, each for something the interpreter lacks (triton 3.9, fla-core 0.6):
    autotune     an ``@triton.autotune`` with several configs benchmarks them on a GPU driver
                 ("0 active drivers"): each Autotuner keeps its first config
    device       ``torch.cuda.device(i)`` (fla's wrappers enter it) needs CUDA: a null context
    loop index   the interpreter runs ``for i_t in range(NT)`` with Python ints, and fla's kernels
                 call ``i_t.to(tl.int64)`` ("'int' object has no attribute 'to'", in
                 fla/ops/common/chunk_h.py): while a kernel runs, ``range`` in its module yields
                 int32 interpreter scalars, as compiled Triton's loop index is
``available()`` says why it cannot run here (no triton, no fla) or returns None.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os


def available() -> str | None:
    """None when the interpreter path can run, else the reason it cannot."""
    for mod, pkg in (("triton", "triton"), ("fla", "fla-core")):
        if importlib.util.find_spec(mod) is None:
            return f"{pkg} is not installed (pip install {pkg})"
    return None


def enable() -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import autotuner, interpreter

    if getattr(interpreter, "_longctx_shims", False):
        return
    run = autotuner.Autotuner.run

    def first_config(self, *args, **kwargs):
        self.configs = self.configs[:1]
        return run(self, *args, **kwargs)

    autotuner.Autotuner.run = first_config
    torch.cuda.device = lambda *a, **k: contextlib.nullcontext()

    def tensor_range(*bounds):
        for i in range(*[int(b) for b in bounds]):
            yield tl.core.tensor(interpreter.TensorHandle(np.array([i], dtype=np.int32), tl.int32), tl.int32)

    call = interpreter.GridExecutor.__call__

    def with_tensor_range(self, *args, **kwargs):
        g = self.fn.__globals__  # the kernel's module: its host code runs outside this window
        saved = g.get("range", None)
        g["range"] = tensor_range
        try:
            return call(self, *args, **kwargs)
        finally:
            if saved is None:
                g.pop("range", None)
            else:
                g["range"] = saved

    interpreter.GridExecutor.__call__ = with_tensor_range
    interpreter._longctx_shims = True
