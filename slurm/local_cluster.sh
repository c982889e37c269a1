#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for CI and developers (run as root).
#
#   slurm/local_cluster.sh start     # munged, slurmctld, slurmd -N node1, slurmd -N node2
#   slurm/local_cluster.sh status    # sinfo
#   slurm/local_cluster.sh stop      # stops only the daemons this script started
#   export SLURM_CONF=/tmp/mednist-gan-slurm/slurm.conf   # then sbatch/squeue/scontrol talk to it
#
# Needs Debian's slurm-wlm and munge (apt-get install slurm-wlm munge). State, logs and the config
# live in $SLURM_LOCAL_DIR (default /tmp/mednist-gan-slurm). Node names resolve through /etc/hosts.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/mednist-gan-slurm}
CONF=$DIR/slurm.conf
NODES=(node1 node2)
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}

write_conf() {
    mkdir -p "$DIR/state" "$DIR/log"
    cat > "$CONF" <<CONF
ClusterName=mednistgan
SlurmctldHost=$(hostname)(127.0.0.1)
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmdSpoolDir=$DIR/spool-%n
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmdTimeout=60
KillWait=30
MinJobAge=600
RequeueExit=
NodeName=node1 NodeAddr=127.0.0.1 Port=${SLURMD_PORT1:-17001} CPUs=$CPUS RealMemory=1000 State=UNKNOWN
NodeName=node2 NodeAddr=127.0.0.1 Port=${SLURMD_PORT2:-17002} CPUs=$CPUS RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
    sed -i '/^RequeueExit=$/d' "$CONF"
}

nodes_up() {
    [ -f "$CONF" ] && [ "$(SLURM_CONF=$CONF timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE 'idle|mix|alloc')" -eq 2 ]
}

start() {
    command -v slurmctld >/dev/null || { echo "slurm-wlm is not installed (apt-get install slurm-wlm munge)" >&2; exit 1; }
    if nodes_up; then
        echo "local SLURM cluster already up: SLURM_CONF=$CONF"
        return 0
    fi
    stop_daemons   # leftovers of an earlier start (stale pid files, a half-started cluster)
    rm -rf "$DIR/state" "$DIR"/spool-*
    for n in "${NODES[@]}"; do
        grep -qE "^127\.0\.0\.1\s.*\b$n\b" /etc/hosts || echo "127.0.0.1 $n" >> /etc/hosts
    done
    write_conf
    export SLURM_CONF=$CONF
    if ! pgrep -x munged >/dev/null; then
        mkdir -p /run/munge /var/log/munge /var/lib/munge
        [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; }
        chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
        chmod 400 /etc/munge/munge.key
        if id munge >/dev/null 2>&1; then
            su -s /bin/sh munge -c "munged" || munged --force
        else
            munged --force
        fi
        echo munged > "$DIR/started-munged"
    fi
    slurmctld -f "$CONF"
    for n in "${NODES[@]}"; do
        mkdir -p "$DIR/spool-$n"
        slurmd -f "$CONF" -N "$n"
    done
    for _ in $(seq 1 60); do
        if nodes_up; then
            echo "local SLURM cluster up: SLURM_CONF=$CONF"
            sinfo -N
            return 0
        fi
        sleep 1
    done
    echo "SLURM nodes did not come up; see $DIR/log" >&2
    sinfo -N >&2 || true
    exit 1
}

stop_daemons() {
    for n in "${NODES[@]}"; do
        [ -f "$DIR/slurmd-$n.pid" ] && kill "$(cat "$DIR/slurmd-$n.pid")" 2>/dev/null || true
    done
    [ -f "$DIR/slurmctld.pid" ] && kill "$(cat "$DIR/slurmctld.pid")" 2>/dev/null || true
    sleep 1
}

stop() {
    [ -f "$CONF" ] && SLURM_CONF=$CONF timeout 10 scancel --quiet -u root 2>/dev/null || true
    stop_daemons
    if [ -f "$DIR/started-munged" ]; then
        pkill -x munged 2>/dev/null || true
        rm -f "$DIR/started-munged"
    fi
    echo "local SLURM cluster stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) SLURM_CONF=$CONF sinfo -N ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
