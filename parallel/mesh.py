"""One device mesh (dp x cp), built in one place from the launcher's environment.

Launchers (torchrun, deepspeed, accelerate) set RANK / LOCAL_RANK / WORLD_SIZE; under
plain ``srun`` we fall back to SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS. CP is the
inner mesh dimension, so the ranks of one CP group are neighbours (same node).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


def env_ranks() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's environment; (0, 0, 1) if none."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"])
    return 0, 0, 1


def check_world(world_size: int, cp: int) -> None:
    if cp < 1 or world_size % cp:
        raise ValueError(f"parallel.cp.size={cp} does not divide the world size {world_size}: "
                         f"launch a multiple of {cp} processes or change parallel.cp.size")


@dataclass
class Mesh:
    rank: int
    local_rank: int
    world_size: int
    dp: int
    cp: int
    device: torch.device
    device_mesh: object = None     # torch DeviceMesh with dims ("dp", "cp"), None for a world of 1

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp

    @property
    def cp_group(self):
        return self.device_mesh["cp"].get_group() if self.device_mesh is not None else None

    @property
    def world_group(self):
        return dist.group.WORLD if dist.is_initialized() else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_mesh(cp: int, device: str = "auto") -> Mesh:
    """Initialise the process group (gloo on CPU, NCCL on CUDA) and the dp x cp mesh."""
    rank, local_rank, world = env_ranks()
    check_world(world, cp)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if world == 1:
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(dev.type, (world // cp, cp), mesh_dim_names=("dp", "cp"))
    return Mesh(rank, local_rank, world, world // cp, cp, dev, mesh)
