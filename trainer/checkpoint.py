"""Atomic, verified, resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout of a run directory:
    run_dir/checkpoints/step_000100/      model + optimizer as the engine writes them (native:
                                          DCP shards .distcp + .metadata; DeepSpeed / Accelerate:
                                          their own files, trainer/engines)
                        step_000100/rank_00003.pt   per-rank state: data loader, RNG, scheduler
                        step_000100/manifest.json   written last: world size, size + CRC-32 of
                                                    every other file, and ``meta`` (the stage, its
                                                    step, the stage's settings)
                        latest                      the newest step written (a convenience only)
A checkpoint is written into ``step_N.tmp`` and renamed once every rank has finished and the
manifest is in place. It is *complete* only when its manifest matches the files on disk; resume
takes the newest complete one and says which newer ones it skipped and why. ``latest`` is never
trusted. A failed save (e.g. disk full) removes its ``.tmp`` directory on every rank's word and
leaves older checkpoints untouched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from models.files import PARTIAL_SUFFIX, crc32_file, write_atomic

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint could not be written or no complete one can be resumed (one-line message)."""


def _describe(paths: list[str], root: str) -> dict:
    return {os.path.relpath(p, root): {"size": os.path.getsize(p), "crc32": crc32_file(p)} for p in paths}


def _all_gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _why(e: BaseException, rank: int) -> str:
    """One line per failing rank; DCP wraps the real exceptions of all ranks in its own."""
    if isinstance(e, CheckpointException):
        return "; ".join(_why(exc, r) for r, (exc, _) in sorted(e.failures.items()))
    text = str(e).strip().splitlines()
    return f"rank {rank}: {text[0] if text else type(e).__name__}"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _files(root: str) -> list[str]:
    """Every finished file under ``root`` (engines may write sub-directories)."""
    out = []
    for d, _, names in os.walk(root):
        out += [os.path.join(d, n) for n in names if not n.endswith(PARTIAL_SUFFIX)]
    return sorted(out)


def save(
    run_dir: str,
    step: int,
    engine,
    scheduler,
    loader,
    rank: int,
    keep: int = 2,
    meta: dict | None = None,
    pinned: set[int] | frozenset[int] = frozenset(),
) -> str:
    """Collective: every rank calls it. ``engine`` (trainer/engines) writes model + optimizer.
    Returns the final checkpoint directory. On any rank's failure every rank raises
    CheckpointError and no trace of this step is left. ``meta`` (JSON-able, rank 0's) goes
    into the manifest (read_meta). The ``keep`` newest checkpoints stay, and those of the steps
    in ``pinned`` (stage ends a later stage starts from)."""
    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, f"step_{step:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    dist.barrier()
    error = None
    try:
        engine.save(tmp)  # collective; a failed write raises on every rank
        extra = {"step": step, "scheduler": scheduler.state_dict(), "data": loader.state_dict(), "rng": _rng_state()}
        write_atomic(os.path.join(tmp, f"rank_{rank:05d}.pt"), lambda p: torch.save(extra, p))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 -- every rank must hear about it
        error = _why(e, rank)
    errors = list(dict.fromkeys(e for e in _all_gather(error) if e))  # DCP reports on every rank
    if not errors:  # each rank checksums a share of the files
        files = _files(tmp)
        shares = _all_gather(_describe(files[rank :: dist.get_world_size()], tmp))
        if rank == 0:
            try:
                manifest = {
                    "step": step,
                    "world_size": dist.get_world_size(),
                    "files": {k: v for share in shares for k, v in share.items()},
                    "meta": meta or {},
                }
                write_atomic(os.path.join(tmp, MANIFEST), lambda p: Path(p).write_bytes(json.dumps(manifest).encode()))
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            except OSError as e:
                errors = [f"rank 0: {e}"]
        errors = _all_gather(errors)[0]
    if errors:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        raise CheckpointError(
            f"could not write the checkpoint of step {step} ({'; '.join(errors)}): "
            "older checkpoints are intact; free disk space or fix the run dir, "
            "then resume"
        )
    if rank == 0:
        try:
            write_atomic(os.path.join(root, "latest"), lambda p: Path(p).write_bytes(str(step).encode()))
        except OSError:
            pass  # `latest` is only a convenience
        _prune(root, keep, pinned)
    dist.barrier()
    return final


def _step_dirs(root: str) -> list[tuple[int, str]]:
    """(step, dir) of every ``step_N`` directory, newest first (``.tmp`` ones are never candidates)."""
    if not os.path.isdir(root):
        return []
    found = [
        (int(m.group(1)), os.path.join(root, d))
        for d in os.listdir(root)
        if (m := _STEP_DIR.match(d)) and os.path.isdir(os.path.join(root, d))
    ]
    return sorted(found, reverse=True)


def newest_saved(run_dir: str) -> str | None:
    """Name of the newest checkpoint directory (for messages; find_resume verifies)."""
    found = _step_dirs(os.path.join(run_dir, "checkpoints"))
    return os.path.basename(found[0][1]) if found else None


def _prune(root: str, keep: int, pinned=frozenset()) -> None:
    for step, d in _step_dirs(root)[keep:] if keep > 0 else []:
        if step not in pinned:
            shutil.rmtree(d, ignore_errors=True)


def _problems(ckpt: str, rank: int, world: int) -> tuple[str | None, int | None]:
    """(first problem this rank finds in its share of ``ckpt``'s files or None, the world size
    the checkpoint was written with)."""
    try:
        with open(os.path.join(ckpt, MANIFEST)) as f:
            manifest = json.load(f)
        files, saved_world = manifest["files"], int(manifest["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is missing or unreadable ({type(e).__name__}): the save did not finish", None
    for name in sorted(files)[rank::world]:
        path = os.path.join(ckpt, name)
        if not os.path.exists(path):
            return f"{name} is missing", saved_world
        if os.path.getsize(path) != files[name]["size"]:
            return f"{name} has {os.path.getsize(path)} bytes, the manifest says {files[name]['size']}", saved_world
        if crc32_file(path) != files[name]["crc32"]:
            return f"{name} fails its checksum", saved_world
    return None, saved_world


def find_resume(run_dir: str, rank: int, world: int) -> tuple[int | None, list[str]]:
    """Collective: the newest complete checkpoint's step (None when there is none at all) and a
    line for each newer one skipped. Every rank verifies a share of the files, so all ranks
    agree. Raises CheckpointError when checkpoints exist but none is usable (never a silent
    fresh start)."""
    skipped = []
    for step, ckpt in _step_dirs(os.path.join(run_dir, "checkpoints")):
        found = _all_gather(_problems(ckpt, rank, world))
        problem = next((p for p, _ in found if p), None)
        saved_world = found[0][1]
        if problem is None and saved_world != world:
            raise CheckpointError(
                f"{ckpt} was written by {saved_world} ranks, this run has {world}: "
                f"resume with {saved_world} ranks, or choose a new trainer.run_dir"
            )
        if problem is None:
            return step, skipped
        skipped.append(f"skipped {os.path.basename(ckpt)}: {problem}")
    if skipped:
        raise CheckpointError(
            f"no complete checkpoint in {run_dir}/checkpoints ({'; '.join(skipped)}): "
            "restore one, or move the directory away to start from scratch"
        )
    return None, skipped


def read_meta(run_dir: str, step: int) -> dict:
    """The ``meta`` a checkpoint's manifest holds ({} for checkpoints written before stages)."""
    with open(os.path.join(run_dir, "checkpoints", f"step_{step:06d}", MANIFEST)) as f:
        return json.load(f).get("meta", {})


def check_resume(run_dir: str, step: int, cfg) -> list[str]:
    """Compare the settings checkpoint ``step`` was written with (its meta's ``config``) with
    ``cfg`` (the TrainConfig of the stage it resumes): ValueError naming each changed model.*
    setting (its weights would not fit, or would compute something else); a notice line for
    each other changed setting."""
    from omegaconf import OmegaConf

    from trainer.run_checks import check_resume_config

    saved = read_meta(run_dir, step).get("config")
    return check_resume_config(saved, OmegaConf.to_container(OmegaConf.structured(cfg)), step)


def newest_complete(run_dir: str) -> str | None:
    """Non-collective: the newest checkpoint directory of ``run_dir`` whose every file matches
    its manifest (for reading weights out of another run), or None."""
    for _, ckpt in _step_dirs(os.path.join(run_dir, "checkpoints")):
        if _problems(ckpt, 0, 1)[0] is None:
            return ckpt
    return None


def load_run_weights(run_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Non-collective: (meta, model state dict) of the newest complete checkpoint of a longctx
    run dir, whichever engine wrote it (DCP or DeepSpeed), LoRA factors merged into their
    weights. ValueError naming the problem when there is none."""
    ckpt = newest_complete(run_dir)
    if ckpt is None:
        raise ValueError(
            f"{run_dir!r} holds no complete longctx checkpoint (checkpoints/step_*/manifest.json): "
            "give a run dir of trainer.train with trainer.save_every > 0 or a finished run"
        )
    return checkpoint_weights(ckpt)


def checkpoint_weights(ckpt: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Non-collective: (meta, model state dict) of the checkpoint directory ``ckpt``, LoRA
    factors merged into their weights."""
    from models.lora import merge_lora_state

    with open(os.path.join(ckpt, MANIFEST)) as f:
        meta = json.load(f).get("meta", {})
    weights = _deepspeed_weights(ckpt)
    if weights is None:
        weights = _dcp_weights(ckpt)
    stage = meta.get("stage_spec", {})
    if stage.get("lora_rank", 0) > 0:
        weights = merge_lora_state(weights, stage["lora_alpha"] / stage["lora_rank"])
    return meta, weights


def _dcp_weights(ckpt: str) -> dict[str, torch.Tensor]:
    """The model's tensors of a native (DCP) checkpoint, read in this one process."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    layout = dcp.FileSystemReader(ckpt).read_metadata().state_dict_metadata
    state = {
        key: torch.empty(m.size, dtype=m.properties.dtype)
        for key, m in layout.items()
        if key.startswith("model.") and isinstance(m, TensorStorageMetadata)
    }
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=ckpt, no_dist=True)
    return {k[len("model.") :]: v for k, v in state.items()}


def _deepspeed_weights(ckpt: str) -> dict[str, torch.Tensor] | None:
    """The whole fp32 weights of a DeepSpeed (any ZeRO stage) checkpoint; None for another engine's."""
    from trainer.engines.deepspeed import TAG

    if not os.path.isdir(os.path.join(ckpt, TAG)):
        return None
    from trainer.engines.deepspeed import consolidated_state_dict

    return {k: v.float() for k, v in consolidated_state_dict(ckpt).items()}


def load(run_dir: str, step: int, engine, scheduler, loader, rank: int) -> int:
    """Collective: restore everything saved at ``step`` (verified by find_resume); returns the step."""
    ckpt = os.path.join(run_dir, "checkpoints", f"step_{step:06d}")
    engine.load(ckpt)
    extra = torch.load(os.path.join(ckpt, f"rank_{rank:05d}.pt"), weights_only=True)
    scheduler.load_state_dict(extra["scheduler"])
    loader.load_state_dict(extra["data"])
    torch.set_rng_state(extra["rng"]["torch"])
    if "cuda" in extra["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["rng"]["cuda"])
    return extra["step"]
