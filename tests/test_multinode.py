"""Multi-node on one machine, over the loopback address only: two torchrun agents (one process
each, ``--nnodes 2 --rdzv-backend c10d``) train the quickstart with CP spanning the two "nodes";
an elastic restart resumes from the last checkpoint by itself; and launch/slurm.sbatch does the
same through a stand-in ``srun`` that starts one launch/torchrun.sh per node with SLURM_* set.
Rank 1 is killed (SIGKILL) after the checkpoint of step 2; ``--max_restarts 1`` restarts both
nodes' workers, which resume from it: each step appears once in metrics.jsonl."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from parallel.mesh import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = [
    "experiment=quickstart",  # hybrid model, parallel.cp.size=2: one CP group across both nodes
    "model.dim=32",
    "data.seq_len=128",
    "data.micro_batch=1",
    "trainer.log_every=1",
    "trainer.save_every=2",
    "trainer.passkey_lengths=[]",
    "trainer.eval_batches=1",
    "trainer.device=cpu",
    "trainer.progress_bar=false",
    "logger.wandb=false",
]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT, GLOO_SOCKET_IFNAME="lo", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # as launch/torchrun.sh sets it (pytorch#135712)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "HYDRA_FULL_ERROR"):
        env.pop(key, None)
    env.update(extra)
    return env


def _store(port):
    """The rendezvous store, held by the test: an agent that hosted it (the first to bind the
    endpoint) could exit while the other still syncs, failing it with RendezvousConnectionError."""
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)


def _curve(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [r["step"] for r in rows if "loss" in r]


def _children(pid):
    """Process ids whose parent is ``pid`` (the agent's workers)."""
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                stat = open(f"/proc/{p}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(p))
    return out


def _finish(procs, timeout):
    """Wait for every process; on a timeout kill the ones this test started."""
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


def _descendants(pid):
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out += kids
        todo += kids
    return out


def _rank_one_worker(pid):
    """The trainer process of global rank 1 started (through launchers) under ``pid``."""
    for w in _descendants(pid):
        try:
            cmd = open(f"/proc/{w}/cmdline").read()
            env = open(f"/proc/{w}/environ").read().split("\0")
        except OSError:
            continue
        if "trainer.train" in cmd and "torch.distributed.run" not in cmd and "RANK=1" in env:
            return w
    return None


def _kill_rank_one_after_first_checkpoint(proc, run_dir, timeout=60):
    """SIGKILL global rank 1 once step 2's checkpoint exists (mid-run: steps 3.. follow)."""
    deadline = time.time() + timeout
    while not os.path.isdir(os.path.join(run_dir, "checkpoints", "step_000002")):
        assert time.time() < deadline and proc.poll() is None, "no checkpoint at step 2"
        time.sleep(0.05)
    worker = _rank_one_worker(proc.pid)
    assert worker is not None
    os.kill(worker, signal.SIGKILL)


# kill: rank 1 is SIGKILLed after step 2's checkpoint and the agents restart both workers.
# Without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 this failed 3 of 8 runs (a restarted worker read the
# peer's pre-restart gloo address from the shared store); with it, 12 of 12 passed
RESTART = [False, True]


@pytest.mark.parametrize("kill", RESTART)
def test_two_torchrun_agents_train_with_cp_across_nodes(tmp_path, kill):
    run = str(tmp_path / "run")
    port = free_port()
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
    agent += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"t{port}"]
    agent += ["--rdzv_conf", "is_host=false", "--local_addr", "127.0.0.1", "--max_restarts", "1"]
    agent += ["-m", "trainer.train"]
    store = _store(port)  # noqa: F841 -- lives until the test ends
    args = QUICK + ["trainer.steps=8", f"trainer.run_dir={run}"]
    logs = [open(tmp_path / f"node{n}.log", "w") for n in range(2)]
    procs = [
        subprocess.Popen(
            agent + args, cwd=ROOT, env=_env(), stdout=logs[n], stderr=subprocess.STDOUT, start_new_session=True
        )
        for n in range(2)
    ]
    try:
        if kill:
            _kill_rank_one_after_first_checkpoint(procs[1], run)
    finally:
        codes = _finish(procs, 120)
    out = (tmp_path / "node0.log").read_text() + (tmp_path / "node1.log").read_text()
    assert codes == [0, 0], out[-4000:]
    assert "world=2 dp=1 cp=2" in out
    assert ("resumed from step" in out) == kill, out[-4000:]  # the restarted workers took the last checkpoint
    assert _curve(run) == list(range(1, 9))  # every step once, across the restart
    assert open(os.path.join(run, "checkpoints", "latest")).read() == "8"


SRUN = """#!/usr/bin/env bash
# stand-in srun: one task per node of the job on this machine, SLURM_* as SLURM sets them
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((n = 0; n < SLURM_NNODES; n++)); do
  SLURM_NODEID=$n SLURM_PROCID=$n SLURM_LOCALID=0 SLURM_NTASKS=$SLURM_NNODES "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


@pytest.mark.parametrize("kill", RESTART)
def test_slurm_sbatch_with_a_stand_in_srun(tmp_path, kill):
    run = str(tmp_path / "run")
    port = free_port()
    store = _store(port)  # noqa: F841 -- lives until the test ends
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = _env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_NNODES="2",
        SLURM_JOB_ID=str(free_port()),
        SLURM_JOB_NODELIST="localhost",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RDZV_CONF="is_host=false",
        LOCAL_ADDR="127.0.0.1",
        NPROC_PER_NODE="1",
        MAX_RESTARTS="1",
    )
    proc = subprocess.Popen(
        ["bash", "launch/slurm.sbatch", *QUICK, "trainer.steps=8", f"trainer.run_dir={run}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        if kill:
            _kill_rank_one_after_first_checkpoint(proc, run)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    assert "world=2 dp=1 cp=2" in out and ("resumed from step" in out) == kill, out[-4000:]
    assert "[longctx] done: step 8" in out, out[-4000:]
    assert _curve(run) == list(range(1, 9))
