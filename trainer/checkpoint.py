"""Atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout of a run directory:
    run_dir/checkpoints/step_000100/      DCP shards of model + optimizer
                        step_000100/rank_00003.pt   per-rank state: data loader, RNG
                        latest                      text file naming the newest complete step
A checkpoint is written into ``step_N.tmp`` and renamed once every rank has finished, and
``latest`` is replaced atomically, so a crash mid-save never leaves a half checkpoint
that resume would pick up.
"""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_step(run_dir: str) -> int | None:
    path = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.exists(path):
        return None
    step = int(open(path).read().strip())
    if not os.path.isdir(os.path.join(run_dir, "checkpoints", f"step_{step:06d}")):
        raise ValueError(
            f"{path} names step {step} but its directory is missing: "
            "delete the 'latest' file to start fresh, or restore the checkpoint"
        )
    return step


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(run_dir: str, step: int, model, optimizer, scheduler, loader, rank: int, keep: int = 2) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, f"step_{step:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    dist.barrier()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=tmp)
    extra = {"step": step, "scheduler": scheduler.state_dict(), "data": loader.state_dict(), "rng": _rng_state()}
    path = os.path.join(tmp, f"rank_{rank:05d}.pt")
    torch.save(extra, path + ".part")
    os.replace(path + ".part", path)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write_text(os.path.join(root, "latest"), str(step))
        _prune(root, keep)
    dist.barrier()
    return final


def _prune(root: str, keep: int) -> None:
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))
    for d in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def load(run_dir: str, step: int, model, optimizer, scheduler, loader, rank: int) -> int:
    """Collective: restore everything saved at ``step``; returns the step."""
    ckpt = os.path.join(run_dir, "checkpoints", f"step_{step:06d}")
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    path = os.path.join(ckpt, f"rank_{rank:05d}.pt")
    if not os.path.exists(path):
        raise ValueError(
            f"{path} is missing: the checkpoint was written with a different world "
            "size; resume with the same number of ranks"
        )
    extra = torch.load(path, weights_only=False)
    scheduler.load_state_dict(extra["scheduler"])
    loader.load_state_dict(extra["data"])
    torch.set_rng_state(extra["rng"]["torch"])
    if "cuda" in extra["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["rng"]["cuda"])
    return extra["step"]
