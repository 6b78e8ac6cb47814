#!/usr/bin/env bash
# Launch longctx training with the DeepSpeed launcher (trainer.engine.name=deepspeed is set for
# you; pick the ZeRO stage with engine=zero3 or trainer.engine.deepspeed.zero_optimization.stage=N).
#
#   launch/deepspeed.sh [hydra overrides...]                  one node, NPROC_PER_NODE ranks
#   HOSTFILE=hosts launch/deepspeed.sh ...                    several nodes over ssh, from a
#                                                             hostfile of "host slots=N" lines
#
# Environment: NPROC_PER_NODE (default: GPUs on this node, else 2), HOSTFILE, MASTER_ADDR /
# MASTER_PORT (default: localhost / 29500), PYTHON (default: the active venv's python, else .venv/
# of this checkout, else python3: see launch/python.sh; DeepSpeed starts every rank with it),
# DEEPSPEED (default: PYTHON -m deepspeed.launcher.runner).
# --no_local_rank: the launcher otherwise appends --local_rank=N, which is not a Hydra override;
# the entry point reads RANK / LOCAL_RANK / WORLD_SIZE, which the launcher sets.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/python.sh"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  default_nproc=$(nvidia-smi -L | wc -l)
else
  default_nproc=2
fi
NPROC_PER_NODE=${NPROC_PER_NODE:-$default_nproc}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -n "${DEEPSPEED:-}" ]]; then
  launcher=("$DEEPSPEED")
else
  launcher=("$PYTHON" -m deepspeed.launcher.runner)
fi

args=(--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --no_local_rank --module)
if [[ -n "${HOSTFILE:-}" ]]; then
  args=(--hostfile "$HOSTFILE" "${args[@]}")
else
  # one node: LOCAL_SIZE tells DeepSpeed's CPU accelerator how many ranks (it counts NUMA nodes)
  export LOCAL_SIZE=${LOCAL_SIZE:-$NPROC_PER_NODE}
  args=(--num_gpus "$NPROC_PER_NODE" "${args[@]}")
fi

exec "${launcher[@]}" "${args[@]}" trainer.train trainer.engine.name=deepspeed "$@"
