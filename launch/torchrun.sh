#!/usr/bin/env bash
# Launch longctx training with torchrun on one node or several.
#
#   launch/torchrun.sh [hydra overrides...]                 one node, NPROC_PER_NODE ranks
#   NNODES=4 MASTER_ADDR=host0 launch/torchrun.sh ...        several nodes (run on each node)
#   sbatch --nodes 4 launch/slurm.sbatch ...                 under SLURM (rendezvous from SLURM_*)
#
# Environment: NPROC_PER_NODE (default: GPUs on this node, else 2), NNODES (default 1 or
# SLURM_NNODES), NODE_RANK (default 0 or SLURM_NODEID), MASTER_ADDR / MASTER_PORT (default:
# first host of SLURM_JOB_NODELIST, else localhost; port 29500), PYTHON (default: the active venv's
# python, else .venv/ of this checkout, else python3: see launch/python.sh), MAX_RESTARTS
# (default 0: torchrun restarts every worker from the last checkpoint this many times after a
# failure), LOCAL_ADDR (this node's address for the rendezvous; default: its hostname's),
# RDZV_CONF (torchrun's --rdzv_conf for several nodes).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python.sh"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  default_nproc=$(nvidia-smi -L | wc -l)
else
  default_nproc=2
fi
NPROC_PER_NODE=${NPROC_PER_NODE:-$default_nproc}
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
if [[ -z "${MASTER_ADDR:-}" ]]; then
  if [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null 2>&1; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  elif [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then  # a compute node without scontrol: the same first host
    MASTER_ADDR=$("$PYTHON" -c 'import os, parallel.mesh as m; print(m.slurm_first_host(os.environ["SLURM_JOB_NODELIST"]))')
  else
    MASTER_ADDR=127.0.0.1
  fi
fi
MASTER_PORT=${MASTER_PORT:-29500}

if [[ "$NNODES" -gt 1 ]]; then
  rdzv=(--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${SLURM_JOB_ID:-longctx}")
else
  rdzv=(--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
fi
if [[ -n "${LOCAL_ADDR:-}" ]]; then
  rdzv+=(--local_addr "$LOCAL_ADDR")
fi
# workers get a store of their own per restart: sharing the agents' store, a restarted node can
# read the address a peer had before the restart (its restart count differs; pytorch#135712)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
if [[ -n "${RDZV_CONF:-}" ]]; then  # e.g. is_host=false: the rendezvous store runs elsewhere
  rdzv+=(--rdzv_conf "$RDZV_CONF")
fi

exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --nproc_per_node "$NPROC_PER_NODE" --max_restarts "${MAX_RESTARTS:-0}" "${rdzv[@]}" -m trainer.train "$@"
