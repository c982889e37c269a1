#!/usr/bin/env bash
# The one launcher for every scale: builds the `accelerate launch` command from environment knobs.
# Manual runs and the SLURM scripts both use it. Arguments are config overrides for the trainer.
# The knobs, their defaults and examples: `launch/run.sh --help` (the usage text below).
#
# Elastic restarts: MAX_RESTARTS=N > 0 (2+ processes) restarts all the processes, on every node, up to N
# times when one of them dies; they meet again in a c10d rendezvous at MAIN_ADDR:MAIN_PORT under the run
# id RDZV_ID (the same on every node) and resume from the newest complete checkpoint. A stop signal
# (SIGUSR1, SIGTERM, Ctrl-C) is not a failure: the launcher passes it to the processes, they checkpoint
# and exit 3, and nothing restarts.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: launch/run.sh [-h | --help] [key=value ...]

Trains at any scale: one process runs `python -m mednist_gan.train`, two or more run
`accelerate launch ... -m mednist_gan.train`. Arguments are config overrides passed to the trainer
(`mednist-gan config-help` lists every key). -h/--help prints this and starts nothing.

Environment variables (default in brackets):
  CONFIG             training recipe, in configs/ [configs/debug.yaml]
  NPROC_PER_NODE     processes on this node [the number of GPUs visible, or 1 without GPUs]
  NUM_NODES          number of nodes [1]
  NODE_RANK          this node's rank, 0 to NUM_NODES-1 [0]
  MAIN_ADDR          address of node 0 [127.0.0.1]
  MAIN_PORT          port on node 0 [29500]
  ACCELERATE_CONFIG  Accelerate launcher config, in launch/ [by scale: launch/accelerate_single_device.yaml
                     for 1 process, launch/accelerate_one_node.yaml for 1 node,
                     launch/accelerate_multi_node.yaml for 2+ nodes]
  MAX_RESTARTS       elastic restarts of all the processes when one dies, 2+ processes only [0: none]
  RDZV_ID            elastic run id, the same on every node [$SLURM_JOB_ID, or mednist-gan]
  SLURM_JOB_ID       set by SLURM; the default of RDZV_ID [unset]
  TORCH_ELASTIC_SHUTDOWN_TIMEOUT
                     with MAX_RESTARTS: seconds the launcher waits for the processes to checkpoint
                     on a stop signal before killing them [100]
  OMP_NUM_THREADS    threads per process without GPUs [cores / NPROC_PER_NODE]

Examples:
  NPROC_PER_NODE=2 launch/run.sh train.max_steps=8     # 2 processes on this machine (CPU: gloo)
  CONFIG=configs/one_node.yaml launch/run.sh data.root=/data/MedNIST     # one node, all its GPUs
  NUM_NODES=2 NODE_RANK=0 MAIN_ADDR=host0 CONFIG=configs/multi_node.yaml launch/run.sh  # on host0
  NUM_NODES=2 NODE_RANK=1 MAIN_ADDR=host0 CONFIG=configs/multi_node.yaml launch/run.sh  # on host1
USAGE
}
for arg in "$@"; do
    if [ "$arg" = -h ] || [ "$arg" = --help ]; then usage; exit 0; fi
done
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The launcher configs were launch/single_device.yaml, one_node.yaml and multi_node.yaml until they
# took an accelerate_ prefix (configs/ has training recipes named one_node.yaml and multi_node.yaml).
if [ -n "${ACCELERATE_CONFIG:-}" ] && [ ! -e "$ACCELERATE_CONFIG" ]; then
    case "/$ACCELERATE_CONFIG" in
        */launch/single_device.yaml | */launch/one_node.yaml | */launch/multi_node.yaml)
            echo "launch/run.sh: error: ACCELERATE_CONFIG=$ACCELERATE_CONFIG was renamed:" \
                 "use ${ACCELERATE_CONFIG%/*}/accelerate_${ACCELERATE_CONFIG##*/}" >&2
            exit 2 ;;
    esac
fi

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
MAX_RESTARTS=${MAX_RESTARTS:-0}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-mednist-gan}}
if ! [[ $MAX_RESTARTS =~ ^[0-9]+$ ]]; then
    echo "launch/run.sh: error: MAX_RESTARTS=$MAX_RESTARTS: expected an integer >= 0" >&2
    exit 2
fi
WORLD=$(( NUM_NODES * NPROC_PER_NODE ))
if [ -z "${ACCELERATE_CONFIG:-}" ]; then
    if [ "$NUM_NODES" -gt 1 ]; then ACCELERATE_CONFIG=launch/accelerate_multi_node.yaml
    elif [ "$WORLD" -gt 1 ]; then ACCELERATE_CONFIG=launch/accelerate_one_node.yaml
    else ACCELERATE_CONFIG=launch/accelerate_single_device.yaml; fi
fi
# Without GPUs the processes use the CPU and gloo; keep them from oversubscribing the cores.
if [ "$gpus" -eq 0 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
    export OMP_NUM_THREADS=$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))
fi

if [ "$WORLD" -eq 1 ] && [ "$ACCELERATE_CONFIG" = launch/accelerate_single_device.yaml ]; then
    cmd=(python -m mednist_gan.train --config "$CONFIG" "$@")   # one process needs no launcher
    if [ "$MAX_RESTARTS" -gt 0 ]; then
        echo "[launch/run.sh] MAX_RESTARTS=$MAX_RESTARTS has no effect on one process (no launcher): it runs once"
    fi
else
    cmd=(accelerate launch --config_file "$ACCELERATE_CONFIG" --num_machines "$NUM_NODES" --machine_rank "$NODE_RANK"
     --num_processes "$WORLD" --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT")
    if [ "$MAX_RESTARTS" -gt 0 ]; then
        # Node 0's launcher (on MAIN_ADDR) hosts the rendezvous store and the others connect to it; left
        # to guess from host names, two "nodes" on one machine both take themselves for the host.
        is_host=$([ "$NODE_RANK" -eq 0 ] && echo true || echo false)
        cmd+=(--max_restarts "$MAX_RESTARTS" --rdzv_backend c10d --rdzv_conf "is_host=$is_host")
        # torchrun's options that `accelerate launch` does not take are read from PET_<OPTION>: the one
        # rendezvous endpoint and run id of every node (with c10d, machine ranks are assigned at the
        # rendezvous, and main_process_ip/port alone would be ignored), and the signals the launcher
        # handles. SIGUSR1 among them: the launcher forwards it to the processes and stops with them,
        # instead of restarting processes that exited after checkpointing on SLURM's warning.
        export PET_RDZV_ENDPOINT="$MAIN_ADDR:$MAIN_PORT" PET_RDZV_ID="$RDZV_ID"
        export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
        # The processes' own store, hosted anew by each attempt's rank 0: the launcher's shared store
        # outlives an attempt, and restarted processes then read the dead ones' keys (gloo addresses,
        # barrier counts) and fail to connect or hang (pytorch/pytorch#135712).
        export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
        # How long the launcher waits for that checkpoint before killing the processes (torch: 30 s);
        # within SLURM's 120 s warning.
        export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}
        echo "[launch/run.sh] elastic: up to $MAX_RESTARTS restart(s)," \
             "c10d rendezvous at $PET_RDZV_ENDPOINT, run id $RDZV_ID"
    fi
    cmd+=(-m mednist_gan.train --config "$CONFIG" "$@")
fi
echo "[launch/run.sh] node $NODE_RANK/$NUM_NODES, $NPROC_PER_NODE process(es) per node: ${cmd[*]}"
# The preemption warning (SIGUSR1) is for the trainer processes, which catch it and checkpoint;
# the launchers between them and SLURM ignore it instead of dying (an ignored signal stays ignored
# across exec, and the trainer installs its own handler). An elastic launcher handles it instead
# (PET_SIGNALS_TO_HANDLE above): it passes it on and exits when the processes have checkpointed.
trap '' USR1
exec "${cmd[@]}"
