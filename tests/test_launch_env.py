"""Rendezvous under plain srun, the spawn harness' backend, and the mesh's group warm-up."""

import pytest
import torch
import torch.distributed as dist

from parallel import mesh
from parallel.spawn import pick_backend, run_distributed


@pytest.mark.parametrize(
    "nodelist,first",
    [("gpu[003-010,12],cpu1", "gpu003"), ("node7", "node7"), ("a[1-2]-ib,b3", "a1-ib"), ("x[09]", "x09")],
)
def test_slurm_first_host(nodelist, first):
    assert mesh.slurm_first_host(nodelist) == first


def test_plain_srun_rendezvous(monkeypatch):
    """Under plain srun (no MASTER_ADDR / MASTER_PORT) every node must derive the same address
    and port from the job, not its own localhost."""
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.setenv(k, "")  # recorded first, so what rendezvous_env sets is undone after the test
        monkeypatch.delenv(k)
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[17-18]")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    mesh.rendezvous_env()
    import os

    assert os.environ["MASTER_ADDR"] == "gpu17" and os.environ["MASTER_PORT"] == str(20000 + 4242)
    monkeypatch.setenv("MASTER_PORT", "1234")  # a launcher's values win
    mesh.rendezvous_env()
    assert os.environ["MASTER_PORT"] == "1234"


def test_pick_backend():
    assert pick_backend("gloo", 4) == "gloo"
    assert pick_backend("auto", 2) == ("nccl" if torch.cuda.device_count() >= 2 else "gloo")
    with pytest.raises(ValueError, match="backend="):
        pick_backend("mpi", 2)


def _warm(rank, world):
    import os

    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
    m = mesh.init_mesh(2, "cpu", subgroup_sizes=(2,))
    return len([g for g in mesh.mesh_groups(m) if g is not None and dist.get_world_size(g) > 1])


@pytest.mark.gloo
def test_mesh_groups_warm_up():
    """Every group the mesh built runs one collective at init (NCCL communicators exist before
    a strategy's first batch_isend_irecv)."""
    assert run_distributed(_warm, 4, timeout=120) == [2, 2, 2, 2]  # dp (size 2) and cp (size 2)
