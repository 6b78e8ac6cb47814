"""Run a function on P local gloo processes, with a timeout: a hang fails, never blocks.

Used by the multi-rank tests and by the benchmarks (bench/).

    results = run_distributed(fn, world_size, *args, timeout=120)

``fn(rank, world_size, *args)`` must be a module-level function; it runs after
``init_process_group`` and its return value (picklable) comes back in rank order.
An exception on any rank fails the call with that rank's traceback.

``backend``: "gloo" (the default: CPU tensors, the tests), "nccl" (rank r on cuda:r, set as
the current device before the group exists, communicators created at init), or "auto"
(NCCL when every rank has a GPU, else gloo; what the benchmarks use).
"""

from __future__ import annotations

import os
import pickle
import traceback

import torch.multiprocessing as mp

from parallel.mesh import free_port


def pick_backend(backend: str, world_size: int) -> str:
    """ "gloo" / "nccl" as asked; "auto": NCCL when CUDA has a GPU for every rank."""
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"backend={backend!r}: use 'gloo', 'nccl' or 'auto'")
    if backend != "auto":
        return backend
    import torch

    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"


def _worker(rank, world_size, port, fn, args, queue, backend):
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    try:
        kw = {}
        if backend == "nccl":  # synchronize / memory statistics / NCCL all refer to the current device
            torch.cuda.set_device(rank)
            kw["device_id"] = torch.device("cuda", rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size, **kw)
        out = fn(rank, world_size, *args)
        # plain pickle copies tensor data; the queue's own pickler would pass shared memory,
        # which breaks when this process exits before the parent has read it
        queue.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 -- report everything to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 180.0, backend: str = "gloo"):
    backend = pick_backend(backend, world_size)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, backend), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        import queue as _q

        for _ in range(world_size):
            try:
                rank, ok, out = queue.get(timeout=timeout)
            except _q.Empty:
                raise TimeoutError(
                    f"distributed test timed out after {timeout}s ({len(results)}/{world_size} ranks finished)"
                ) from None
            if ok:
                results[rank] = pickle.loads(out)
            else:
                errors.append(f"--- rank {rank} ---\n{out}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("a rank failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


__all__ = ["pick_backend", "run_distributed"]
