#!/usr/bin/env bash
# The one launcher for every scale: builds the `accelerate launch` command from environment knobs.
# Manual runs and the SLURM scripts both use it. Arguments are config overrides for the trainer.
#
#   launch/run.sh                                              # debug config, 1 process (or all GPUs)
#   NPROC_PER_NODE=2 launch/run.sh train.max_steps=8           # 2 processes on this machine
#   CONFIG=configs/one_node.yaml launch/run.sh data.root=/data/MedNIST
#   NUM_NODES=2 NODE_RANK=0 MAIN_ADDR=host0 CONFIG=configs/multi_node.yaml launch/run.sh   # on host0
#   NUM_NODES=2 NODE_RANK=1 MAIN_ADDR=host0 CONFIG=configs/multi_node.yaml launch/run.sh   # on host1
#
# Knobs (defaults): NPROC_PER_NODE (GPUs visible, or 1 without GPUs), NUM_NODES (1), NODE_RANK (0),
# MAIN_ADDR (127.0.0.1), MAIN_PORT (29500), CONFIG (configs/debug.yaml),
# ACCELERATE_CONFIG (launch/single_device.yaml, one_node.yaml or multi_node.yaml by scale).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
NPROC_PER_NODE=${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
NUM_NODES=${NUM_NODES:-1}
NODE_RANK=${NODE_RANK:-0}
MAIN_ADDR=${MAIN_ADDR:-127.0.0.1}
MAIN_PORT=${MAIN_PORT:-29500}
CONFIG=${CONFIG:-configs/debug.yaml}
WORLD=$(( NUM_NODES * NPROC_PER_NODE ))
if [ -z "${ACCELERATE_CONFIG:-}" ]; then
    if [ "$NUM_NODES" -gt 1 ]; then ACCELERATE_CONFIG=launch/multi_node.yaml
    elif [ "$WORLD" -gt 1 ]; then ACCELERATE_CONFIG=launch/one_node.yaml
    else ACCELERATE_CONFIG=launch/single_device.yaml; fi
fi
# Without GPUs the processes use the CPU and gloo; keep them from oversubscribing the cores.
if [ "$gpus" -eq 0 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
    export OMP_NUM_THREADS=$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))
fi

if [ "$WORLD" -eq 1 ] && [ "$ACCELERATE_CONFIG" = launch/single_device.yaml ]; then
    cmd=(python -m mednist_gan.train --config "$CONFIG" "$@")   # one process needs no launcher
else
    cmd=(accelerate launch --config_file "$ACCELERATE_CONFIG" --num_machines "$NUM_NODES" --machine_rank "$NODE_RANK"
     --num_processes "$WORLD" --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT"
     -m mednist_gan.train --config "$CONFIG" "$@")
fi
echo "[launch/run.sh] node $NODE_RANK/$NUM_NODES, $NPROC_PER_NODE process(es) per node: ${cmd[*]}"
# The preemption warning (SIGUSR1) is for the trainer processes, which catch it and checkpoint;
# the launchers between them and SLURM ignore it instead of dying (an ignored signal stays ignored
# across exec, and the trainer installs its own handler).
trap '' USR1
exec "${cmd[@]}"
