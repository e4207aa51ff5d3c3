#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost, for tests and local runs of tokenbench.
#
#   bash slurm/local_cluster.sh start            # install if needed, start everything, print env.sh path
#   bash slurm/local_cluster.sh status           # exit 0 only if every daemon is up
#   bash slurm/local_cluster.sh stop [--purge]   # stop by recorded PIDs; --purge also deletes the state dir
#
#   source .slurm/env.sh                         # sets SLURM_CONF for sbatch/sacct/submitit
#
# Why real accounting (slurmdbd + MariaDB) and not accounting_storage/none: submitit polls job state with
# `sacct` only, and the real `sacct` refuses to run without a database. Without it, any job that dies
# without writing its result would leave `job.result()` waiting forever.
#
# Why everything lives in one state dir: the cluster must not touch /etc/slurm or /var/lib/mysql of the
# machine, must survive `stop`/`start` with its job history, and must be wiped in one `rm` (`--purge`).
# The one shared thing is munge: Slurm's clients look for munged at the system socket /run/munge, so we run
# munged there (or reuse one that is already answering) with the machine's /etc/munge/munge.key.
#
# Where the state dir is: <repo root>/.slurm (git-ignored). The daemons that drop privileges (mariadbd as
# user mysql, munged) must reach it; when the checkout sits under a folder they cannot traverse (a 0700
# home, mktemp -d), `start` puts the state in /var/tmp/tokenbench-slurm-<hash of the repo path> instead
# and makes <repo root>/.slurm a link to it, so every reader (env.sh, tests, run_bench) still finds it
# at <repo root>/.slurm.
#
# Environment:
#   TOKENBENCH_SLURM_DIR      state dir (default: <repo root>/.slurm, or where that link points)
#   TOKENBENCH_SLURM_TIMEOUT  seconds each wait loop may take before giving up (default 60)
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$SCRIPT_DIR")
LINK=$REPO_ROOT/.slurm              # where readers look; a folder, or a link made by `start`
if [[ -n ${TOKENBENCH_SLURM_DIR:-} ]]; then
    STATE_DIR=$TOKENBENCH_SLURM_DIR
elif [[ -L $LINK ]]; then
    STATE_DIR=$(readlink -f -- "$LINK")
else
    STATE_DIR=$LINK
fi
# Absolute path: it is baked into slurm.conf and env.sh, which are read from other working directories.
[[ $STATE_DIR == /* ]] || STATE_DIR=$PWD/$STATE_DIR
STATE_DIR=${STATE_DIR%/}
TIMEOUT=${TOKENBENCH_SLURM_TIMEOUT:-60}

CLUSTER_NAME=tokenbench
NODE=$(hostname -s)
CTLD_PORT=6817
SLURMD_PORT=6818
DBD_PORT=6819
DB_PORT=3307

PACKAGES=(munge slurm-wlm slurmctld slurmd slurm-client slurmdbd mariadb-server)
DAEMONS=(munged mariadb slurmdbd slurmctld slurmd)   # start order; stop goes in reverse
declare -A COMM=([munged]=munged [mariadb]=mariadbd [slurmdbd]=slurmdbd [slurmctld]=slurmctld [slurmd]=slurmd)
# Paths inside the state dir (set again if `start` moves the state dir: see choose_state_dir).
state_paths() {
    CONF=$STATE_DIR/slurm.conf
    DBD_CONF=$STATE_DIR/slurmdbd.conf   # slurmdbd has no -f: it reads slurmdbd.conf next to $SLURM_CONF
    ENV_SH=$STATE_DIR/env.sh
    PID_DIR=$STATE_DIR/pids             # PIDs recorded by this script: the only thing `stop` ever signals
    RUN_DIR=$STATE_DIR/run              # pid files the daemons write themselves (informational)
    LOG_DIR=$STATE_DIR/log
    SPOOL_DIR=$STATE_DIR/spool
    MUNGE_DIR=$STATE_DIR/munge          # munged runs as user munge: its own pid file goes in a dir it owns
    DB_DIR=$STATE_DIR/mariadb           # datadir + socket, owned by user mysql for the same reason
    DB_SOCK=$DB_DIR/run/mariadbd.sock
    DB_PASS_FILE=$STATE_DIR/db.pass     # generated once so restarts reuse the existing database user
    MARKER=$STATE_DIR/.tokenbench-slurm # `stop --purge` only deletes a dir that carries this marker

    # Where each daemon logs. munged and mariadbd log to stderr in the foreground, so their stdout/stderr is
    # their log. The Slurm daemons in the foreground write their LogFile *and* echo it to stderr, so their
    # stderr goes to a separate file that only matters for errors before the LogFile is opened.
    declare -gA LOGFILE=([munged]=$LOG_DIR/munged.log [mariadb]=$LOG_DIR/mariadb.log
                        [slurmdbd]=$LOG_DIR/slurmdbd.log [slurmctld]=$LOG_DIR/slurmctld.log
                        [slurmd]=$LOG_DIR/slurmd.log)
    declare -gA OUTFILE=([munged]=$LOG_DIR/munged.log [mariadb]=$LOG_DIR/mariadb.log
                        [slurmdbd]=$LOG_DIR/slurmdbd.stderr [slurmctld]=$LOG_DIR/slurmctld.stderr
                        [slurmd]=$LOG_DIR/slurmd.stderr)

    # Every Slurm command below (ours and the daemons') must see this cluster's config, never /etc/slurm.
    export SLURM_CONF=$CONF
}
state_paths


log() { printf '[local_cluster] %s\n' "$*"; }
DIE_HINT=""
die() { printf '[local_cluster] ERROR: %s%s\n' "$*" "$DIE_HINT" >&2; exit 1; }

show_log_tail() {
    local name=$1 f n=30
    for f in "${LOGFILE[$name]}" "${OUTFILE[$name]}"; do
        if [[ -s $f ]]; then
            printf -- '--- last %s lines of %s ---\n' "$n" "$f" >&2
            tail -n "$n" "$f" >&2
        fi
        [[ ${LOGFILE[$name]} == "${OUTFILE[$name]}" ]] && break
        n=10   # the stderr file mostly repeats the log; it matters for errors before the log was opened
    done
    return 0
}

# ---------------------------------------------------------------------------------------------------------
# PIDs. A recorded PID only counts as "our daemon" if the process is alive (zombies are dead: PID 1 in a
# container may never reap them), has the expected name, and mentions this state dir in its command line or
# environment. That last check keeps a recycled PID, or the same daemon started for another state dir, from
# ever being signalled by `stop`.
# ---------------------------------------------------------------------------------------------------------
recorded_pid() {
    local f=$PID_DIR/$1.pid pid
    [[ -s $f ]] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    printf '%s' "$pid"
}

pid_is_alive() {
    local pid=$1 stat
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    # Field 3 is the state; the name in field 2 is in parentheses and may contain spaces.
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

is_ours() {
    local name=$1 pid comm
    pid=$(recorded_pid "$name") || return 1
    pid_is_alive "$pid" || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "${COMM[$name]}" ]] || return 1
    # (Read into a variable rather than piping into `grep -q`: with pipefail, grep's early exit would make
    # the pipeline fail.) slurmdbd has no path on its command line and only root may read its environ, so
    # the pid file it writes into this state dir (PidFile) also counts as proof.
    local ids
    ids=$(tr '\0' '\n' 2>/dev/null <"/proc/$pid/cmdline"; tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ") || true
    [[ $ids == *"$STATE_DIR/"* ]] && return 0
    [[ -r $RUN_DIR/$name.pid && $(<"$RUN_DIR/$name.pid") == "$pid" ]]
}

# setsid: the daemons must outlive this script and not die with the terminal or process group it ran in.
# In a non-interactive shell a background child is never a process-group leader, so setsid execs in place
# and $! is the daemon's own PID (is_ours() double-checks that by name afterwards).
launch() {
    local name=$1; shift
    setsid "$@" </dev/null >>"${OUTFILE[$name]}" 2>&1 &
    printf '%s\n' "$!" >"$PID_DIR/$name.pid"
}

# wait_until <daemon> <description> <command...>: poll a readiness check, failing fast if the daemon died
# and with the daemon's log tail on timeout, so a broken start never hangs a test run.
wait_until() {
    local name=$1 what=$2; shift 2
    local deadline=$((SECONDS + TIMEOUT))
    local pid=""
    [[ -n $name ]] && pid=$(recorded_pid "$name")
    until "$@" >/dev/null 2>&1; do
        # Only liveness here: right after launch the PID briefly still runs setsid/setpriv, not the daemon.
        if [[ -n $pid ]] && ! pid_is_alive "$pid"; then
            show_log_tail "$name"
            die "$name exited while waiting for: $what"
        fi
        if ((SECONDS >= deadline)); then
            [[ -n $name ]] && show_log_tail "$name"
            die "timed out after ${TIMEOUT}s waiting for: $what"
        fi
        sleep 0.2
    done
    if [[ -n $name ]] && ! is_ours "$name"; then
        die "recorded PID $pid is not $name; something else answered for: $what"
    fi
}

# Something already listening on a port we need would make a daemon fail with a less obvious message.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
require_free_port() {
    ! port_busy "$1" || die "port $1 on 127.0.0.1 is in use by a process this script did not start ($2 needs it)"
}

# Write a file only if its content changed, so a `start` on a running cluster does not touch live configs.
write_if_changed() {
    local dest=$1 mode=$2 tmp
    tmp=$(mktemp "$dest.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f $dest ]] && cmp -s "$tmp" "$dest"; then
        rm -f "$tmp"
    else
        mv -f "$tmp" "$dest"
    fi
}

# ---------------------------------------------------------------------------------------------------------
# Installation
# ---------------------------------------------------------------------------------------------------------
missing_packages() {
    local p
    for p in "${PACKAGES[@]}"; do
        [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] || printf '%s\n' "$p"
    done
}

install_packages() {
    local missing
    mapfile -t missing < <(missing_packages)
    ((${#missing[@]} == 0)) && return 0
    [[ $EUID -eq 0 ]] || die "packages missing (${missing[*]}); run as root to install them"
    log "installing: ${missing[*]}"
    local t0=$SECONDS own_policy=0
    # Without systemd the maintainer scripts would try to start the system-wide daemons (with /etc configs
    # and the standard ports); policy-rc.d exiting 101 tells invoke-rc.d not to.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        own_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if ((own_policy)); then
        rm -f /usr/sbin/policy-rc.d
        trap - EXIT
    fi
    log "installed in $((SECONDS - t0))s"
}

# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------
mysql_can_reach() { setpriv --reuid=mysql --regid=mysql --init-groups test -x "$1" 2>/dev/null; }

# The default state dir <repo>/.slurm only works if user mysql can traverse the checkout's path. If it
# cannot (and neither TOKENBENCH_SLURM_DIR nor an earlier start decided), move the state to a folder under
# /var/tmp named after the repo path, and link <repo>/.slurm to it for the readers.
choose_state_dir() {
    [[ -z ${TOKENBENCH_SLURM_DIR:-} && $STATE_DIR == "$LINK" && ! -L $LINK ]] || return 0
    mysql_can_reach "$REPO_ROOT" && return 0
    [[ -d $LINK ]] && die "$LINK exists but user 'mysql' cannot reach it ($REPO_ROOT is not traversable); remove it, or set TOKENBENCH_SLURM_DIR"
    STATE_DIR=/var/tmp/tokenbench-slurm-$(printf '%s' "$REPO_ROOT" | sha1sum | cut -c1-12)
    state_paths
    mkdir -p "$STATE_DIR"
    ln -sfn "$STATE_DIR" "$LINK"
    log "state dir $STATE_DIR: user 'mysql' cannot traverse $REPO_ROOT; $LINK links there"
}

make_dirs() {
    mkdir -p "$STATE_DIR" "$PID_DIR" "$RUN_DIR" "$LOG_DIR" "$SPOOL_DIR/slurmctld" "$SPOOL_DIR/slurmd"
    touch "$MARKER"
    # The daemons that drop privileges need to reach the state dir; a dir under e.g. /root (0700) breaks
    # them with obscure errors, so say so plainly.
    setpriv --reuid=mysql --regid=mysql --init-groups test -x "$STATE_DIR" ||
        die "$STATE_DIR is not reachable by user 'mysql'; pick a TOKENBENCH_SLURM_DIR under a world-traversable path"
    install -d -o munge -g munge -m 0700 "$MUNGE_DIR"
    install -d -o mysql -g mysql -m 0750 "$DB_DIR" "$DB_DIR/data" "$DB_DIR/run"
    # Log files are opened by this (root) shell and handed to the daemons as stdout/stderr (munged and
    # mariadbd log there in the foreground; the Slurm daemons also write their LogFile).
    touch "${LOGFILE[@]}" "${OUTFILE[@]}"
}

write_configs() {
    # Node shape from the hardware. RealMemory at ~90% of what slurmd detects: if the configured value is
    # ever above what slurmd reports at registration, the node is drained.
    local hw kv key val cpus="" boards="" sockets="" cores="" threads="" mem=""
    hw=$(slurmd -C | head -n 1)
    for kv in $hw; do
        key=${kv%%=*} val=${kv#*=}
        case $key in
            CPUs) cpus=$val ;;
            Boards) boards=$val ;;
            SocketsPerBoard) sockets=$val ;;
            CoresPerSocket) cores=$val ;;
            ThreadsPerCore) threads=$val ;;
            RealMemory) mem=$val ;;
        esac
    done
    [[ -n $cpus && -n $mem ]] || die "could not parse 'slurmd -C' output: $hw"
    mem=$((mem * 9 / 10))

    if [[ ! -s $DB_PASS_FILE ]]; then
        (umask 077 && od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$DB_PASS_FILE")
    fi
    local pass
    pass=$(<"$DB_PASS_FILE")

    write_if_changed "$CONF" 0644 <<EOF
# Generated by slurm/local_cluster.sh: edits are overwritten on the next start.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
# Everything runs as root: a private test cluster, no slurm user or file ownership to manage.
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job must wait before it may start again (default 120 s).
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
# No cgroups in this kind of machine: track processes by parentage, bind nothing, gather no usage.
# Consequence: --mem and --cpus-per-task shape scheduling only; nothing enforces them.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Fast scheduling so tests do not wait on the default 60 s intervals.
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
KillWait=5
# Keep finished jobs visible to squeue/scontrol for an hour (submitit and tests look them up).
MinJobAge=3600
# A node that was down (e.g. across stop/start) comes back by itself when slurmd registers.
ReturnToService=2
# Requeue (preemption, scontrol requeue, submitit checkpointing) must be allowed.
JobRequeue=1
PreemptType=preempt/none
# Real accounting, so that sacct (which submitit polls) works.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
JobCompType=jobcomp/none
StateSaveLocation=$SPOOL_DIR/slurmctld
SlurmdSpoolDir=$SPOOL_DIR/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=${LOGFILE[slurmctld]}
SlurmdLogFile=${LOGFILE[slurmd]}
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus Boards=${boards:-1} SocketsPerBoard=${sockets:-1} CoresPerSocket=${cores:-$cpus} ThreadsPerCore=${threads:-1} RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes=$NODE MaxTime=30 State=UP
EOF

    # 0600 and owned by SlurmUser (root), or slurmdbd refuses to start: it holds the database password.
    write_if_changed "$DBD_CONF" 0600 <<EOF
# Generated by slurm/local_cluster.sh: edits are overwritten on the next start.
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=$NODE
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=${LOGFILE[slurmdbd]}
PidFile=$RUN_DIR/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$pass
StorageLoc=slurm_acct_db
EOF

    write_if_changed "$ENV_SH" 0644 <<EOF
# Generated by slurm/local_cluster.sh. Source it before sbatch/squeue/sacct/srun or a Python using submitit.
export SLURM_CONF=$(printf '%q' "$CONF")
export TOKENBENCH_SLURM_DIR=$(printf '%q' "$STATE_DIR")
EOF
}

# ---------------------------------------------------------------------------------------------------------
# Daemons, in start order
# ---------------------------------------------------------------------------------------------------------
munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munged() {
    if is_ours munged; then return 0; fi
    rm -f "$PID_DIR/munged.pid" "$PID_DIR/munged.external"
    if munge_works; then
        # Another munged (e.g. the machine's own) already serves /run/munge: use it, but never stop it.
        log "munged: reusing the munged already answering on /run/munge (not managed by this script)"
        touch "$PID_DIR/munged.external"
        return 0
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key >/dev/null
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    # A socket left behind by a munged that was killed makes the new one refuse to start.
    [[ -S /run/munge/munge.socket.2 ]] && rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    # setpriv (unlike runuser/su) execs without forking, so the recorded PID is munged's own.
    launch munged setpriv --reuid=munge --regid=munge --init-groups \
        /usr/sbin/munged --foreground --pid-file="$MUNGE_DIR/munged.pid"
    wait_until munged "munge -n | unmunge" munge_works
}

db_sql() { mariadb --no-defaults --protocol=socket --socket="$DB_SOCK" -u root; }

start_mariadb() {
    if ! is_ours mariadb; then
        require_free_port "$DB_PORT" mariadb
        rm -f "$DB_SOCK"
        if [[ ! -d $DB_DIR/data/mysql ]]; then
            log "mariadb: initialising datadir $DB_DIR/data"
            # root authenticates by unix socket: only root on this machine can administer this instance.
            mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DIR/data" \
                --auth-root-authentication-method=socket --skip-test-db \
                >>"${LOGFILE[mariadb]}" 2>&1 || { show_log_tail mariadb; die "mariadb-install-db failed"; }
        fi
        # --no-defaults: ignore /etc/mysql/*.cnf, which points at the system datadir, socket and port.
        launch mariadb /usr/sbin/mariadbd --no-defaults --user=mysql \
            --datadir="$DB_DIR/data" --socket="$DB_SOCK" --pid-file="$DB_DIR/run/mariadbd.pid" \
            --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
            --innodb-buffer-pool-size=256M --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 \
            --max-allowed-packet=16M
        wait_until mariadb "mariadb to answer on $DB_SOCK" \
            mariadb-admin --no-defaults --protocol=socket --socket="$DB_SOCK" -u root ping
    fi
    # Idempotent, and re-run each start so the user always matches the password in slurmdbd.conf.
    local pass
    pass=$(<"$DB_PASS_FILE")
    db_sql <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
}

sacctmgr_answers() { timeout 10 sacctmgr -i -n list cluster format=cluster; }

start_slurmdbd() {
    if ! is_ours slurmdbd; then
        require_free_port "$DBD_PORT" slurmdbd
        launch slurmdbd /usr/sbin/slurmdbd -D
        wait_until slurmdbd "slurmdbd to answer 'sacctmgr list cluster'" sacctmgr_answers
    fi
    # slurmctld registers its cluster itself, but doing it here first avoids a window in which the first
    # jobs' records could be refused.
    local clusters
    clusters=$(sacctmgr_answers) || die "sacctmgr stopped answering"
    if ! grep -qxF "$CLUSTER_NAME" <<<"${clusters//[[:blank:]]/}"; then
        timeout 20 sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
    fi
}

ctld_up() {
    local out
    out=$(timeout 10 scontrol ping 2>/dev/null) || return 1
    [[ $out == *"is UP"* ]]
}

start_slurmctld() {
    is_ours slurmctld && return 0
    require_free_port "$CTLD_PORT" slurmctld
    launch slurmctld /usr/sbin/slurmctld -D -f "$CONF"
    wait_until slurmctld "'scontrol ping' to say UP" ctld_up
}

# Ready = slurmd registered since we launched it (after a restart slurmctld still remembers the node as
# idle from its saved state, so "idle" alone would pass too early) and the node can take jobs.
SLURMD_LAUNCHED_AT=0
node_ready() {
    local line start_time start_epoch state
    line=$(timeout 10 scontrol -o show node "$NODE") || return 1
    start_time=$(sed -nE 's/.*SlurmdStartTime=([^ ]+).*/\1/p' <<<"$line")
    start_epoch=$(date -d "${start_time/T/ }" +%s 2>/dev/null) || return 1
    ((start_epoch >= SLURMD_LAUNCHED_AT)) || return 1
    state=$(timeout 10 sinfo -h -n "$NODE" -o %T | head -n 1)
    case $state in
        idle | mixed | allocated) return 0 ;;
        drained | draining)
            # e.g. "Kill task failed" left over from before a stop: not something ReturnToService clears.
            timeout 10 scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
            return 1 ;;
        *) return 1 ;;
    esac
}

start_slurmd() {
    is_ours slurmd && return 0
    require_free_port "$SLURMD_PORT" slurmd
    # SlurmdStartTime has one-second resolution.
    SLURMD_LAUNCHED_AT=$(($(date +%s) - 1))
    launch slurmd /usr/sbin/slurmd -D -f "$CONF" -N "$NODE"
    wait_until slurmd "node $NODE to register and be idle ('sinfo -h -o %T')" node_ready
}

sacct_works() { timeout 10 sacct -n -X -S now-1minutes -o JobID >/dev/null; }

all_up() {
    local d
    if [[ -e $PID_DIR/munged.external ]]; then munge_works || return 1; else is_ours munged || return 1; fi
    for d in mariadb slurmdbd slurmctld slurmd; do is_ours "$d" || return 1; done
    ctld_up
}

cmd_start() {
    local t0=$SECONDS
    if [[ -d $STATE_DIR ]] && all_up; then
        log "already running (state dir $STATE_DIR)"
        log "source $ENV_SH"
        return 0
    fi
    [[ $EUID -eq 0 ]] || die "start must run as root (the daemons run as root/munge/mysql)"
    DIE_HINT=$'\n[local_cluster] daemons started so far are left running for inspection; logs in '"$LOG_DIR"$'\n[local_cluster] `bash '"${BASH_SOURCE[0]}"' stop` stops them'
    install_packages
    choose_state_dir
    make_dirs
    write_configs
    start_munged
    start_mariadb
    start_slurmdbd
    start_slurmctld
    start_slurmd
    wait_until "" "'sacct' to answer" sacct_works
    log "source $ENV_SH"
    printf 'SLURM cluster %s up in %ss: node %s, partitions %s, accounting slurmdbd:%s -> mariadb:%s, state %s\n' \
        "$CLUSTER_NAME" "$((SECONDS - t0))" "$NODE" \
        "$(sinfo -h -o %P | paste -sd, -)" "$DBD_PORT" "$DB_PORT" "$STATE_DIR"
}

# ---------------------------------------------------------------------------------------------------------
# stop / status
# ---------------------------------------------------------------------------------------------------------
stop_daemon() {
    local name=$1 pid i
    if [[ $name == munged && -e $PID_DIR/munged.external ]]; then
        rm -f "$PID_DIR/munged.external"
        return 0
    fi
    if ! is_ours "$name"; then
        # Not running, or the PID now belongs to something else: never signal it.
        rm -f "$PID_DIR/$name.pid"
        return 0
    fi
    pid=$(recorded_pid "$name")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        pid_is_alive "$pid" || break
        sleep 0.1
    done
    if pid_is_alive "$pid"; then
        log "$name (pid $pid) ignored SIGTERM for 10s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            pid_is_alive "$pid" || break
            sleep 0.1
        done
    fi
    pid_is_alive "$pid" && die "could not stop $name (pid $pid)"
    rm -f "$PID_DIR/$name.pid"
    log "stopped $name (pid $pid)"
}

cmd_stop() {
    local purge=0 i
    case ${1:-} in
        "") ;;
        --purge) purge=1 ;;
        *) die "unknown option for stop: $1 (only --purge)" ;;
    esac
    if [[ -d $PID_DIR ]]; then
        # Jobs still running when slurmd goes away would leave their slurmstepd processes behind (no cgroups
        # to reap them), so cancel them while the controller can still do it.
        local jobs=()
        if is_ours slurmctld && is_ours slurmd && ctld_up; then
            mapfile -t jobs < <(timeout 10 squeue -h -o %A 2>/dev/null || true)
        fi
        if ((${#jobs[@]})); then
            log "cancelling ${#jobs[@]} remaining job(s): ${jobs[*]}"
            timeout 10 scancel --full "${jobs[@]}" >/dev/null 2>&1 || true
            for ((i = 0; i < 30; i++)); do
                [[ -z $(timeout 10 squeue -h -t running,completing -o %i 2>/dev/null) ]] && break
                sleep 0.5
            done
        fi
        for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
            stop_daemon "${DAEMONS[i]}"
        done
    fi
    if ((purge)) && [[ -d $STATE_DIR ]]; then
        [[ -e $MARKER ]] || die "refusing to delete $STATE_DIR: it has no $(basename "$MARKER") marker"
        rm -rf -- "$STATE_DIR"
        log "removed $STATE_DIR"
        if [[ -L $LINK && ! -e $LINK ]]; then
            rm -f -- "$LINK"
            log "removed the link $LINK"
        fi
    fi
    log "stopped"
}

cmd_status() {
    local ok=0 d pid
    if [[ ! -d $STATE_DIR ]]; then
        echo "no state dir $STATE_DIR: cluster never started here"
        return 1
    fi
    for d in "${DAEMONS[@]}"; do
        if [[ $d == munged && -e $PID_DIR/munged.external ]]; then
            if munge_works; then echo "munged     up (external munged, not managed here)"
            else echo "munged     DOWN (external munged no longer answers)"; ok=1; fi
        elif is_ours "$d"; then
            printf '%-10s up (pid %s)\n' "$d" "$(recorded_pid "$d")"
        else
            pid=$(recorded_pid "$d" 2>/dev/null || true)
            printf '%-10s DOWN%s\n' "$d" "${pid:+ (recorded pid $pid not running)}"
            ok=1
        fi
    done
    echo "--- scontrol ping"
    timeout 15 scontrol ping 2>&1 || true
    ctld_up || ok=1
    echo "--- sinfo"
    timeout 15 sinfo 2>&1 || true
    echo "--- SLURM_CONF=$CONF (source $ENV_SH)"
    return "$ok"
}

usage() {
    sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

case ${1:-} in
    start) cmd_start ;;
    stop) shift; cmd_stop "$@" ;;
    status) cmd_status ;;
    -h | --help | help) usage ;;
    *) usage >&2; exit 2 ;;
esac
