#!/usr/bin/env bash
# A throwaway single-node SLURM on this machine, for tests/cluster (needs root and Debian's
# slurm-wlm and munge packages: `make test-cluster` installs them).
#
#   tests/cluster/slurm.sh up DIR     write DIR/slurm.conf, start munged, slurmctld and slurmd
#                                     (pid files in DIR), wait until the node is idle
#   tests/cluster/slurm.sh down DIR   cancel DIR's jobs, stop the daemons named by DIR's pid files
#
# Everything lives in DIR: config, state, spool, logs, the munge socket. Nothing is written to
# /etc/slurm, so SLURM clients elsewhere on the machine stay unconfigured (with a system-wide
# slurm.conf but no controller, every `snakemake` start would wait ~10 s on `scontrol`).
# Clients reach this cluster only with SLURM_CONF=DIR/slurm.conf, or through the wrappers in
# DIR/bin (put it first on PATH; they set SLURM_CONF). Traffic stays on 127.0.0.1.
# Ports: SLURMCTLD_PORT and SLURMD_PORT (default 6817 and 6818).
set -euo pipefail

cmd=${1:?usage: slurm.sh up|down DIR}
dir=${2:?usage: slurm.sh up|down DIR}
dir=$(cd "$dir" && pwd)
conf=$dir/slurm.conf
export SLURM_CONF=$conf

log() { echo "slurm.sh: $*" >&2; }

dump_logs() {
    for f in "$dir"/munge/munged.log "$dir"/slurmctld.log "$dir"/slurmd.log; do
        [[ -f $f ]] && { echo "--- $f (tail)" >&2; tail -n 30 "$f" >&2; }
    done
    return 0
}

fail() {
    log "$*"
    dump_logs
    exit 1
}

# Stop the process a pid file names, if it is alive and its command line mentions DIR
# (a stale pid file must never make us kill an unrelated process).
stop_pid() {
    local pidfile=$1 pid i
    [[ -f $pidfile ]] || return 0
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid && -r /proc/$pid/cmdline ]] || return 0
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$dir" || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    log "pid $pid ($pidfile) ignored SIGTERM; killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

down() {
    if [[ -f $dir/slurmctld.pid ]] && command -v scancel >/dev/null; then
        timeout 20 scancel --user "$(id -un)" 2>/dev/null || true
    fi
    stop_pid "$dir/slurmd.pid"
    stop_pid "$dir/slurmctld.pid"
    stop_pid "$dir/munge/munged.pid"
}

up() {
    [[ $(id -u) == 0 ]] || fail "needs root (slurmd runs jobs as their user; CI runs as root)"
    local exe real
    for exe in munged slurmctld slurmd sinfo sbatch squeue; do
        command -v "$exe" >/dev/null || [[ -x /usr/sbin/$exe ]] ||
            fail "$exe not found: install Debian's slurm-wlm and munge (make test-cluster does)"
    done
    export PATH=$PATH:/usr/sbin
    id munge >/dev/null 2>&1 || fail "no munge user: is the munge package installed?"

    # munge: the machine's key (created if missing), our own daemon and socket in DIR
    local key=/etc/munge/munge.key
    if [[ ! -s $key ]]; then
        log "creating the munge key $key"
        install -d -o munge -g munge -m 0700 /etc/munge
        mungekey --create --keyfile "$key"
        chown munge:munge "$key"
        chmod 0400 "$key"
    fi
    chmod 0755 "$dir"
    install -d -o munge -g munge -m 0755 "$dir/munge"
    runuser -u munge -- munged --key-file="$key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed" || fail "munged did not start"
    munge -n -S "$dir/munge/munge.socket" | unmunge -S "$dir/munge/munge.socket" >/dev/null ||
        fail "munge round trip failed"

    # slurm.conf for this machine: its CPUs, its memory less 1 GiB, no accounting, no cgroups
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(free -m | awk '/^Mem:/ {print $2}')
    mem=$((mem > 2048 ? mem - 1024 : mem))
    mkdir -p "$dir/state" "$dir/spool"
    cat >"$conf" <<EOF
ClusterName=dsftest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmdParameters=config_overrides
# finished jobs stay visible to squeue (the executor's status command) for 5 minutes
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

    # Client commands bound to this cluster, for PATH: snakemake's slurm-jobstep plugin starts
    # each job's `srun` with every SLURM_* variable removed, SLURM_CONF included (a real cluster
    # has /etc/slurm/slurm.conf or configless DNS, which this one must not install).
    mkdir -p "$dir/bin"
    for exe in srun sbatch squeue scancel sinfo scontrol sacct; do
        real=$(command -v "$exe") || continue
        printf '#!/bin/bash\nSLURM_CONF=%q exec %q "$@"\n' "$conf" "$real" >"$dir/bin/$exe"
        chmod 0755 "$dir/bin/$exe"
    done

    slurmctld -f "$conf" -c || fail "slurmctld did not start"
    slurmd -f "$conf" || fail "slurmd did not start"

    local i state=""
    for i in $(seq 60); do
        state=$(timeout 5 sinfo -h -N -o %t 2>/dev/null | head -n 1 || true)
        [[ $state == idle ]] && break
        sleep 1
    done
    [[ $state == idle ]] || fail "node not idle after 60 s (sinfo state: '${state:-none}')"
    log "single-node SLURM up: $host, $cpus CPUs, ${mem} MB, SLURM_CONF=$conf"
}

case $cmd in
up) up ;;
down) down ;;
*) fail "unknown command $cmd (up or down)" ;;
esac
