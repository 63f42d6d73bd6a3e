#!/usr/bin/env bash
# A one-node SLURM cluster on this host, for the tests marked `slurm` and for CI:
#   tests/slurm/cluster.sh start   # installs slurm-wlm and munge when absent (apt, as root)
#   tests/slurm/cluster.sh stop [DAEMON...]  # stops the daemons (or those named) by their
#                                            # pid files
#   tests/slurm/cluster.sh running # the daemons alive now, one a line (munged slurmctld slurmd)
#   tests/slurm/cluster.sh env     # the line to source: export SLURM_CONF=...
# The host is its own controller and its only node (CPUs=2 by default, BREASTNET_SLURM_CPUS);
# config, state, logs and pid files live under BREASTNET_SLURM_DIR (default
# ${TMPDIR:-/tmp}/breastnet-slurm). Processes are tracked without cgroups
# (proctrack/linuxproc, task/none), so it runs in a container. Jobs run as the user that
# started it. Finished jobs stay in `scontrol show job` for an hour (no accounting daemon).
set -euo pipefail

DIR=${BREASTNET_SLURM_DIR:-${TMPDIR:-/tmp}/breastnet-slurm}
CPUS=${BREASTNET_SLURM_CPUS:-2}
CONF=$DIR/slurm.conf
HOST=$(hostname -s)

install() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return
    if [ "$(id -u)" != 0 ]; then
        echo "cluster.sh: slurm-wlm and munge are not installed (apt-get install needs root)" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_config() {
    mkdir -p "$DIR"/{munge,state,spool,log}
    chmod 700 "$DIR/munge"
    [ -s "$DIR/munge/munge.key" ] || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 \
        count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
    local memory user
    memory=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
    user=$(id -un)
    cat >"$CONF" <<CONF
ClusterName=breastnet
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
SlurmctldPort=${BREASTNET_SLURMCTLD_PORT:-6817}
SlurmdPort=${BREASTNET_SLURMD_PORT:-6818}
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=3600
DefMemPerCPU=1024
KillWait=10
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

running() {  # the daemon whose pid file is $1 is alive
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

start() {
    install
    if running "$DIR/slurmctld.pid" && running "$DIR/slurmd.pid"; then
        echo "cluster.sh: already running (SLURM_CONF=$CONF)"
        return
    fi
    write_config
    running "$DIR/munged.pid" || munged --force --key-file="$DIR/munge/munge.key" \
        --socket="$DIR/munge/munge.socket" --pid-file="$DIR/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed"
    export SLURM_CONF=$CONF
    running "$DIR/slurmctld.pid" || slurmctld -f "$CONF"
    running "$DIR/slurmd.pid" || slurmd -f "$CONF"
    for _ in $(seq 60); do
        if sinfo -h -N -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            echo "cluster.sh: up, $CPUS CPUs on $HOST (export SLURM_CONF=$CONF)"
            return
        fi
        sleep 1
    done
    echo "cluster.sh: the node did not come up; logs in $DIR/log" >&2
    tail -n 20 "$DIR"/log/*.log >&2 || true
    exit 1
}

DAEMONS=(slurmd slurmctld munged)  # the order they stop in

running_daemons() {
    for daemon in "${DAEMONS[@]}"; do
        if running "$DIR/$daemon.pid"; then echo "$daemon"; fi
    done
}

stop() {  # the named daemons (default: all), each by its pid file
    local names=("$@")
    [ $# -gt 0 ] || names=("${DAEMONS[@]}")
    for daemon in "${DAEMONS[@]}"; do
        [[ " ${names[*]} " == *" $daemon "* ]] || continue
        local pidfile=$DIR/$daemon.pid
        if running "$pidfile"; then
            local pid
            pid=$(cat "$pidfile")
            kill "$pid"
            for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        fi
        rm -f "$pidfile"
    done
    echo "cluster.sh: stopped ${names[*]}"
}

case ${1:-} in
    start) start ;;
    stop) shift; stop "$@" ;;
    running) running_daemons ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop [DAEMON...]|running|env" >&2; exit 2 ;;
esac
