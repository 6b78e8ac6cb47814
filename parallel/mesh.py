"""One device mesh (dp x cp), built in one place from the launcher's environment.

Launchers (torchrun, deepspeed, accelerate) set RANK / LOCAL_RANK / WORLD_SIZE; under
plain ``srun`` we fall back to SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS. CP is the
inner mesh dimension, so the ranks of one CP group are neighbours (same node).
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def slurm_first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("gpu[003-010,12],cpu1" -> "gpu003"), without
    scontrol (not every compute node has it on PATH)."""
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    prefix, ranges, suffix = m.group(1), m.group(2), m.group(3)
    if not ranges:
        return prefix + suffix
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def rendezvous_env() -> None:
    """Set MASTER_ADDR / MASTER_PORT where the launcher did not. torchrun, deepspeed and
    accelerate set both; under plain ``srun`` every node must agree without them, so the
    address is the job's first node and the port is derived from the job id (two jobs sharing
    a node do not collide); with neither, one machine (127.0.0.1, a free port for a world of 1)."""
    env = os.environ
    if "MASTER_ADDR" not in env and "SLURM_JOB_NODELIST" in env:
        env["MASTER_ADDR"] = slurm_first_host(env["SLURM_JOB_NODELIST"])
    if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env:
        env["MASTER_PORT"] = str(20000 + int(env["SLURM_JOB_ID"]) % 20000)
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env and env_ranks()[2] == 1:
        env["MASTER_PORT"] = str(free_port())


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
        raise ValueError(
            f"parallel.cp.size={cp} does not divide the world size {world_size}: "
            f"launch a multiple of {cp} processes or change parallel.cp.size"
        )


@dataclass
class Mesh:
    rank: int
    local_rank: int
    world_size: int
    dp: int
    cp: int
    device: torch.device
    device_mesh: object = None  # torch DeviceMesh with dims ("dp", "cp"), None for a world of 1
    subgroups: dict = field(default_factory=dict)  # size -> SubMesh of the CP group (build_subgroups)

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
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for MASTER_PORT on one machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_mesh(cp: int, device: str = "auto", subgroup_sizes=()) -> Mesh:
    """Initialise the process group (gloo on CPU, NCCL on CUDA), the dp x cp mesh and every
    sub-group of the CP group the strategies need (``subgroup_sizes``, e.g. USP's Ulysses
    degree): all process groups exist before the first forward."""
    rank, local_rank, world = env_ranks()
    check_world(world, cp)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        rendezvous_env()
        # device_id: NCCL creates the communicators now (and new groups eagerly), not at each
        # group's first collective
        kw = {"device_id": dev} if use_cuda else {}
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world, **kw)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dev.type, (world // cp, cp), mesh_dim_names=("dp", "cp"))
    out = Mesh(rank, local_rank, world, world // cp, cp, dev, mesh)
    if cp > 1:
        out.subgroups = build_subgroups(out.cp_group, cp, subgroup_sizes)
    warm_up_groups(out)
    return out


def mesh_groups(mesh: Mesh) -> list:
    """Every process group of this rank in a fixed order, each step's groups partitioning the
    world: dp, cp, then per sub-mesh size the Ulysses and the ring sub-group."""
    if mesh.device_mesh is None:
        return []
    groups = [mesh.device_mesh["dp"].get_group(), mesh.cp_group]
    for u in sorted(mesh.subgroups):
        sub = mesh.subgroups[u]
        groups += [sub.ulysses_group, sub.ring_group]
    out = []  # a sub-group that is the whole CP group is that group: once
    for g in groups:
        if g is not None and all(g is not o for o in out):
            out.append(g)
    return out


def warm_up_groups(mesh: Mesh) -> None:
    """One all_reduce on every group of the mesh, so each NCCL communicator exists before the
    first forward: a strategy where a rank with nothing to send skips ``batch_isend_irecv``
    (allgather's needed chunks, s2) needs every rank to have entered the group's first
    collective, which NCCL requires to be collective."""
    one = torch.ones(1, device=mesh.device)
    for g in mesh_groups(mesh):
        if g is not None and dist.get_world_size(g) > 1:
            dist.all_reduce(one, group=g)


def build_subgroups(group, cp: int, sizes) -> dict:
    """{u: SubMesh} for each Ulysses degree u in ``sizes`` (collective over the world: every
    rank must call it with the same sizes, in the same order)."""
    return {u: build_submesh(group, cp, u) for u in sorted(set(sizes))}


@dataclass
class SubMesh:
    """This rank's two sub-groups of one CP group. Member lists hold CP ranks in sub-group
    rank order (``new_group`` sorts by global rank)."""

    ulysses_group: object | None
    ulysses_members: list[int]  # my U_g
    ring_group: object | None
    ring_members: list[list[int]]  # for each member of my R_j: the members of its U_g
    ring_rank: int


def _all_cp_groups(global_ranks: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Global ranks of every CP group in the world (one gather, only when dp > 1)."""
    world = dist.get_world_size()
    if len(global_ranks) == world:
        return [global_ranks]
    every = [None] * world
    dist.all_gather_object(every, global_ranks)
    return sorted(set(every))


def build_submesh(group, cp: int, u: int) -> SubMesh:
    """Create the sub-groups with ``dist.new_group``, identically and in the same order on
    every rank of the world (all CP groups' sub-groups, members or not); keep ours.
    A sub-group that is the whole CP group reuses ``group``; one of size 1 is None."""
    mine = tuple(dist.get_process_group_ranks(group))
    me = mine.index(dist.get_rank())
    r = cp // u
    result = None
    for granks in _all_cp_groups(mine):

        def members(cps, granks=granks):  # CP ranks in their sub-group's rank order
            cps = list(cps)
            return cps if len(cps) == cp else sorted(cps, key=granks.__getitem__)

        def make(cps, granks=granks):
            if len(cps) == 1 or len(cps) == cp:
                return group if len(cps) == cp and granks == mine else None
            return dist.new_group([granks[c] for c in cps])

        uly = [members(range(g * u, (g + 1) * u)) for g in range(r)]
        rings = [members(uly[g][j] for g in range(r)) for j in range(u)]
        uly_groups, ring_groups = [make(m) for m in uly], [make(m) for m in rings]
        if granks == mine:
            j = next(i for i, m in enumerate(rings) if me in m)
            result = SubMesh(
                uly_groups[me // u], uly[me // u], ring_groups[j], [uly[c // u] for c in rings[j]], rings[j].index(me)
            )
    return result
