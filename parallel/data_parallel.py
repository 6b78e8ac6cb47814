"""Data parallelism over the whole dp x cp world: DDP or FSDP2.

CP ranks hold replicas of the parameters and see different tokens of the same rows, so
gradients are reduced over *all* ranks. Both wrappers average; the trainer scales each
rank's loss by ``world_size / global_token_count`` so the average is the exact gradient
of the global mean loss.
"""

from __future__ import annotations

import torch
from torch import nn

DP_MODES = ("ddp", "fsdp")


def wrap_data_parallel(model: nn.Module, mode: str, mesh) -> nn.Module:
    if mode not in DP_MODES:
        raise ValueError(f"parallel.dp_mode={mode!r} is unknown: choose one of {DP_MODES}")
    if mesh.world_size == 1:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [mesh.device.index] if mesh.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    flat = mesh.device_mesh._flatten("dp_cp") if hasattr(mesh.device_mesh, "_flatten") else mesh.device_mesh
    for block in model.layers.values():
        fully_shard(block, mesh=flat)
    fully_shard(model, mesh=flat)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole parameters by name, gathering FSDP2 shards (DTensors); collective under FSDP2:
    call it on every rank."""
    out = {}
    for name, p in unwrap(model).named_parameters():
        if hasattr(p, "full_tensor"):  # a DTensor shard
            p = p.full_tensor()
        out[name] = p.detach()
    return out


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def no_sync(model: nn.Module, active: bool):
    """Context manager skipping gradient sync for all but the last micro-step (DDP)."""
    import contextlib

    if active and hasattr(model, "no_sync"):
        return model.no_sync()
    if active and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        return _restore_sync(model)
    return contextlib.nullcontext()


class _restore_sync:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.model.set_requires_gradient_sync(True)
