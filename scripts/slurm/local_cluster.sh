#!/usr/bin/env bash
# A single-node SLURM cluster from Debian's packages (slurmctld, slurmd, slurmdbd on MariaDB, munge), for the
# SLURM test of the sweep (tests/test_sweep_slurm.py) and for trying `python -m tools.sweep submit` on one
# machine. Runs as root; no systemd, no cgroups; nothing under /etc or /run is changed: every config, socket,
# pid file, log, spool and the database live in DIR.
#
# Usage: scripts/slurm/local_cluster.sh install      apt-get the packages (--no-install-recommends) if missing
#        scripts/slurm/local_cluster.sh start DIR    write the configs into DIR (created, or empty), start munged,
#                                                    mariadbd, slurmdbd, slurmctld and slurmd, wait until the
#                                                    node is idle; prints SLURM_CONF=DIR/slurm.conf (export it)
#        scripts/slurm/local_cluster.sh stop DIR     cancel every job, stop every daemon that start started (by
#                                                    the PIDs recorded in DIR/pids), newest first
# Environment: PYTHON (default python3) finds free loopback ports; WAIT_S (default 60) bounds every wait.
# Every failure ends with one "error:" line and exit code 2.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
WAIT_S=${WAIT_S:-60}

die() {
    printf 'error: %s\n' "$*" >&2
    exit 2
}

need_root() {
    [[ $(id -u) == 0 ]] || die "$1 needs root (the daemons run as root); run it as root, e.g. with sudo"
}

# wait_for WHAT COMMAND...: run COMMAND until it succeeds, at most WAIT_S seconds
wait_for() {
    local what=$1 deadline=$((SECONDS + WAIT_S))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "$what not ready after ${WAIT_S}s; see the logs in $DIR"
        sleep 0.2
    done
}

# launch NAME COMMAND...: start a daemon in the foreground of its own session, its output in DIR/NAME.out
launch() {
    local name=$1
    shift
    setsid "$@" >"$DIR/$name.out" 2>&1 </dev/null &
    printf '%s %s\n' "$!" "$name" >>"$DIR/pids"
}

free_ports() {
    "${PYTHON:-python3}" -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))'
}

install() {
    need_root install
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} with your package manager"
    apt-get update -qq || die "apt-get update failed: the Debian package mirrors must be reachable"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
        die "apt-get install ${missing[*]} failed (see above)"
}

write_configs() {
    local host=$1 ctld_port=$2 slurmd_port=$3 dbd_port=$4 db_port=$5 cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2))
    cat >"$DIR/slurm.conf" <<EOF
ClusterName=bimors
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job waits cred_expire seconds before it starts again (default 120)
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
DependencyParameters=kill_invalid_depend
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
AccountingStoragePass=$DIR/munge/munge.socket
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=300
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
PidFile=$DIR/slurmdbd.pid
LogFile=$DIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=root
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/slurmdbd.conf"
}

start() {
    need_root start
    [[ -n ${1:-} ]] || die "start needs a folder: $0 start DIR"
    DIR=$(realpath -m "$1")
    mkdir -p "$DIR"
    [[ -z $(ls -A "$DIR") ]] || die "$DIR is not empty; give a new or empty folder (stop a cluster with: $0 stop $DIR)"
    chmod 755 "$DIR" # munged serves its socket only from folders that everyone may enter
    local up=$DIR
    while [[ $up != / ]]; do
        up=$(dirname "$up")
        [[ $(stat -c %A "$up") == ?????????[xt] ]] || die "munged needs every folder above $DIR to be enterable by all; $up is not: give a folder under /tmp"
    done
    local cmd
    for cmd in munged mungekey mariadbd mariadb-install-db mariadb-admin slurmdbd slurmctld slurmd sinfo; do
        command -v "$cmd" >/dev/null || die "$cmd not found; install the packages first: $0 install"
    done
    local host ports
    host=$(hostname -s)
    read -r -a ports <<<"$(free_ports)"
    mkdir -p "$DIR/munge" "$DIR/state" "$DIR/spool" "$DIR/mysql"
    : >"$DIR/pids"
    trap 'stop "$DIR" >/dev/null 2>&1' EXIT # a failed start stops what it started
    write_configs "$host" "${ports[@]}"

    mungekey -c -k "$DIR/munge/munge.key"
    launch munged munged -F --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
    wait_for munged test -S "$DIR/munge/munge.socket"

    local small=(--innodb-log-file-size=8M --innodb-buffer-pool-size=64M) # 26 MB on disk instead of 114 MB
    mariadb-install-db --datadir="$DIR/mysql" --user=root --auth-root-authentication-method=normal \
        --skip-test-db "${small[@]}" >"$DIR/mariadb-install.out" 2>&1 || die "mariadb-install-db failed; see $DIR/mariadb-install.out"
    launch mariadbd mariadbd --no-defaults --user=root --datadir="$DIR/mysql" --socket="$DIR/mysqld.sock" "${small[@]}" \
        --pid-file="$DIR/mysqld.pid" --bind-address=127.0.0.1 --port="${ports[3]}" --log-error="$DIR/mariadbd.log"
    wait_for mariadbd mariadb-admin --no-defaults --socket="$DIR/mysqld.sock" -uroot ping

    export SLURM_CONF=$DIR/slurm.conf
    launch slurmdbd slurmdbd -D  # reads slurmdbd.conf next to $SLURM_CONF
    wait_for slurmdbd sacctmgr -n list cluster
    launch slurmctld slurmctld -D -f "$DIR/slurm.conf"
    wait_for slurmctld scontrol ping
    launch slurmd slurmd -D -f "$DIR/slurm.conf"
    wait_for "the node" node_idle "$host"
    trap - EXIT
    printf 'SLURM_CONF=%s\n' "$SLURM_CONF"
}

node_idle() {
    [[ $(sinfo -h -n "$1" -o %T) == idle ]]
}

stop() {
    [[ -n ${1:-} ]] || die "stop needs the folder given to start: $0 stop DIR"
    DIR=$(realpath -m "$1")
    [[ -f $DIR/pids ]] || die "$DIR/pids not found: $DIR is not a folder of $0 start"
    if [[ -f $DIR/slurm.conf ]]; then
        SLURM_CONF=$DIR/slurm.conf timeout 20 scancel --full --quiet --user=root >/dev/null 2>&1 || true
    fi
    local pid name deadline
    tac "$DIR/pids" | while read -r pid name; do
        kill -TERM "$pid" 2>/dev/null || continue
        deadline=$((SECONDS + 20))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            printf '%s (pid %s) ignored SIGTERM for 20s: killed\n' "$name" "$pid" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
}

case ${1:-} in
    install) install ;;
    start) start "${2:-}" ;;
    stop) stop "${2:-}" ;;
    *) die "usage: $0 install | start DIR | stop DIR" ;;
esac
