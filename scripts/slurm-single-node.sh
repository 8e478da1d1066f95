#!/usr/bin/env bash
# Start (or stop) a one-node Slurm cluster on this machine, from Debian's slurm-wlm and munge,
# to test `--plugin SLURM` and the job-array recipe. Run as root. Not for production.
#
#   apt-get install slurm-wlm munge        # once
#   scripts/slurm-single-node.sh start     # writes /etc/slurm/slurm.conf, starts munged,
#                                          # slurmctld and slurmd; waits for the node to be idle
#   scripts/slurm-single-node.sh stop
#
# What one node needs (and this sets): the controller and the node on localhost, with the node
# named after `hostname -s`; no accounting database (no slurmdbd: `sacct` is not available, and
# Nipype's SLURM plugin does not need it: it polls `squeue` and reads result files); proctrack
# linuxproc and no task/cgroup plugins (cgroups may not be delegated in containers); every
# CPU and most of the memory of the machine. Jobs share this machine's filesystem, which is all
# Nipype's plugin needs of a "shared" work directory.
set -euo pipefail

STATE=${SLURM_STATE:-/var/tmp/slurm-single-node}
CONF=/etc/slurm/slurm.conf
PARTITION=${SLURM_PARTITION:-debug}

running() { [[ -f $STATE/$1.pid ]] && kill -0 "$(<"$STATE/$1.pid")" 2>/dev/null; }

start() {
    local node cpus mem_mb
    node=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) * 9 / 10240 ))
    mkdir -p "$STATE"/{ctld,slurmd,log} /etc/slurm /run/munge
    chown munge:munge /run/munge
    [[ -s /etc/munge/munge.key ]] || { mungekey --create --force; chown munge:munge /etc/munge/munge.key; }

    cat > "$CONF" <<EOF
# One-node test cluster written by brainage-bids scripts/slurm-single-node.sh
ClusterName=single
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=30
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
    munge -n | unmunge >/dev/null || { echo "munge does not work" >&2; exit 1; }
    running slurmctld || slurmctld -i
    running slurmd || slurmd
    for _ in $(seq 60); do
        if sinfo -h -N -o '%T' 2>/dev/null | grep -qx idle; then
            sinfo -N -l
            return 0
        fi
        sleep 1
    done
    echo "the node did not become idle; see $STATE/log/" >&2
    sinfo -N -l || true
    exit 1
}

stop() {
    local f
    for f in slurmd slurmctld; do
        if [[ -f $STATE/$f.pid ]]; then
            kill "$(<"$STATE/$f.pid")" 2>/dev/null || true
        fi
    done
    if [[ -f /run/munge/munged.pid ]]; then kill "$(</run/munge/munged.pid)" 2>/dev/null || true; fi
}

case ${1:-start} in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 64 ;;
esac
