# Sourced by the sbatch scripts: pass a preemption warning (SIGUSR1 to the batch script) on to the
# trainer processes, wait for their checkpoint, then requeue the job so that it resumes from it.
PREEMPTED=0
forward_warning() {
    PREEMPTED=1
    echo "$(date -Is) preemption warning: asking the trainer to checkpoint, then requeueing"
    scancel --signal=USR1 "$SLURM_JOB_ID"   # every job step's processes, not this script
}
trap forward_warning USR1

wait_and_requeue() {
    local pid=$1 status=0
    while true; do
        wait "$pid" && status=0 || status=$?
        kill -0 "$pid" 2>/dev/null || break   # 'wait' also returns when a trapped signal arrives
    done
    if [ "$PREEMPTED" -eq 1 ]; then
        echo "$(date -Is) trainer stopped (exit $status); requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    exit "$status"
}
