#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the tests and for trying `hybrid submit`.
#
#   slurm/local-cluster.sh start    # start munged, slurmctld and slurmd; wait until the node is idle
#   slurm/local-cluster.sh status   # exit 0 when the node answers (idle, mixed or allocated)
#   slurm/local-cluster.sh env      # print the line to paste: export SLURM_CONF=...
#   slurm/local-cluster.sh stop     # stop the three daemons this script started
#
# Needs root and Debian's `slurm-wlm` and `munge` packages:
#   apt-get install -y slurm-wlm munge
# Everything lives in $HYBRID_SLURM_DIR (default /tmp/hybrid-slurm): its own munge key and socket,
# its own slurm.conf, spool, state and logs, and its own ports ($HYBRID_SLURM_PORT, default 6917,
# and the next one), so a system Slurm or munge on the same machine is left alone. Slurm's
# commands find this cluster through SLURM_CONF (printed by `start` and `env`).
#
# The settings are the ones that work in a container: SlurmUser=root, proctrack/linuxproc (no
# cgroups), task/none, select/cons_tres with CR_Core, one node named `hostname -s` with nproc CPUs.
# AuthInfo cred_expire=10: Slurm keeps a requeued job pending for cred_expire + 1 seconds
# (default 121 s); 10 keeps the requeue test short. sched_interval=2 schedules promptly.
set -euo pipefail

DIR=${HYBRID_SLURM_DIR:-/tmp/hybrid-slurm}
PORT=${HYBRID_SLURM_PORT:-6917}
CONF=$DIR/slurm.conf
MUNGE_DIR=$DIR/munge
SOCKET=$MUNGE_DIR/munge.socket
export SLURM_CONF=$CONF

die() {
    echo "local-cluster: $*" >&2
    exit 1
}

need_tools() {
    local tool missing=()
    for tool in munged slurmctld slurmd sinfo sbatch scontrol; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    if ((${#missing[@]})); then
        die "not installed: ${missing[*]}; install with: apt-get install -y slurm-wlm munge"
    fi
    [[ $EUID -eq 0 ]] || die "must run as root (slurmd starts jobs as their users)"
}

node_state() {
    sinfo --noheader --format=%T 2>/dev/null | head -n 1
}

alive() {
    [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

running() {
    # the pid files first: sinfo retries for seconds when no controller answers
    alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && [[ -f $CONF ]] &&
        [[ $(node_state) =~ ^(idle|mixed|allocated|completing) ]]
}

write_conf() {
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat >"$CONF" <<EOF
# Written by slurm/local-cluster.sh: a one-node test cluster.
ClusterName=hybrid-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
JobRequeue=1
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=10
MinJobAge=600
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    mkdir -p "$MUNGE_DIR"
    chown munge:munge "$MUNGE_DIR"
    chmod 0755 "$MUNGE_DIR"
    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        dd if=/dev/urandom bs=1k count=1 of="$MUNGE_DIR/munge.key" status=none
    fi
    chown munge:munge "$MUNGE_DIR/munge.key"
    chmod 0400 "$MUNGE_DIR/munge.key"
    if [[ -S $SOCKET ]] && alive "$MUNGE_DIR/munged.pid"; then
        return
    fi
    runuser -u munge -- munged --force --socket="$SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" ||
        die "munged did not start; see $MUNGE_DIR/munged.log"
}

start() {
    need_tools
    if running; then
        echo "local-cluster: already running ($CONF)"
        echo "export SLURM_CONF=$CONF"
        return
    fi
    mkdir -p "$DIR"/{state,spool,log}
    chmod 0755 "$DIR"
    start_munge
    write_conf
    slurmctld -c || die "slurmctld did not start; see $DIR/log/slurmctld.log"
    slurmd || die "slurmd did not start; see $DIR/log/slurmd.log"
    local i
    for i in $(seq 1 60); do
        if running; then
            echo "local-cluster: node $(hostname -s) is $(node_state) (SLURM_CONF=$CONF)"
            echo "export SLURM_CONF=$CONF"
            return
        fi
        sleep 0.5
    done
    die "the node did not become idle in 30 s; see $DIR/log/slurmctld.log and slurmd.log"
}

stop_pidfile() {
    local pidfile=$1 pid i
    [[ -f $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
        for i in $(seq 1 40); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
    fi
    rm -f "$pidfile"
}

stop() {
    stop_pidfile "$DIR/slurmd.pid"
    stop_pidfile "$DIR/slurmctld.pid"
    stop_pidfile "$MUNGE_DIR/munged.pid"
    echo "local-cluster: stopped"
}

case ${1:-} in
start) start ;;
stop) stop ;;
status)
    if running; then
        echo "local-cluster: node $(hostname -s) is $(node_state) (SLURM_CONF=$CONF)"
    else
        echo "local-cluster: not running" >&2
        exit 1
    fi
    ;;
env) echo "export SLURM_CONF=$CONF" ;;
*)
    echo "usage: $0 start|stop|status|env" >&2
    exit 2
    ;;
esac
