#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for hpcpipe's tests.
#
#   bash tests/slurm/testbed.sh start    # install (if missing), configure, start; idempotent
#   bash tests/slurm/testbed.sh status   # which daemons are up
#   bash tests/slurm/testbed.sh stop     # cancel jobs, stop our daemons by their pid files
#   bash tests/slurm/testbed.sh env      # prints the exports a client needs (eval "$(...)")
#
# Needs root (it installs packages, writes /etc/hosts, runs the daemons as root).
#
# Two Slurm versions, selected by HPCPIPE_SLURM_VERSION (default 22.05); both can run at once:
#   22.05 (default): Debian 12's slurm-wlm from /usr; state in /var/tmp/hpcpipe-slurm; ClusterName
#         hpcpipe-test; ports slurmctld 17817, slurmdbd 17819, mysqld 17306, slurmd 17001-17002;
#         the machine's munged (/run/munge). Clients: export SLURM_CONF=/var/tmp/hpcpipe-slurm/slurm.conf
#   25.11: SchedMD's 25.11.7 built from ../shared/slurm/slurm-25.11.7.tar.gz (beside the checkout;
#          HPCPIPE_SLURM_TARBALL overrides) into /opt/slurm-25.11
#         (once per machine, 4-7 min on 2 cores; `build-25.11` does only that, `install`/`start`
#         build it if missing); state in /var/tmp/hpcpipe-slurm-25.11; ClusterName hpcpipe-2511;
#         ports slurmctld 17827, slurmdbd 17829, mysqld 17316, slurmd 17011-17012; its own munged
#         on $DIR/munge/munge.socket (AuthInfo=socket=...), so stopping one cluster never breaks
#         the other. Clients need its SLURM_CONF *and* its binaries first on PATH:
#           export SLURM_CONF=/var/tmp/hpcpipe-slurm-25.11/slurm.conf
#           export PATH=/opt/slurm-25.11/bin:/opt/slurm-25.11/sbin:$PATH
#         or: eval "$(HPCPIPE_SLURM_VERSION=25.11 bash tests/slurm/testbed.sh env)"
#   HPCPIPE_SLURM_VERSION=25.11 bash tests/slurm/testbed.sh start|stop|status
# HPCPIPE_TESTBED_DIR still overrides the state folder of either version.
# Comments below say why the less obvious settings are there.
set -euo pipefail

SLURM_VERSION=${HPCPIPE_SLURM_VERSION:-22.05}
SLURM_PREFIX_2511=/opt/slurm-25.11
case $SLURM_VERSION in
    22.05)
        DIR=$(realpath -m "${HPCPIPE_TESTBED_DIR:-/var/tmp/hpcpipe-slurm}")
        CLUSTER=hpcpipe-test
        # Private ports, so the testbed cannot collide with a real Slurm or MariaDB on the same machine.
        CTLD_PORT=17817
        DBD_PORT=17819
        MYSQL_PORT=17306
        SLURMD_PORTS=17001-17002
        MUNGE_SOCK=  # the machine's default socket
        ;;
    25.11)
        DIR=$(realpath -m "${HPCPIPE_TESTBED_DIR:-/var/tmp/hpcpipe-slurm-25.11}")
        CLUSTER=hpcpipe-2511
        CTLD_PORT=17827
        DBD_PORT=17829
        MYSQL_PORT=17316
        SLURMD_PORTS=17011-17012
        MUNGE_SOCK=$DIR/munge/munge.socket
        export PATH=$SLURM_PREFIX_2511/bin:$SLURM_PREFIX_2511/sbin:$PATH
        ;;
    *)
        echo "testbed: ERROR: HPCPIPE_SLURM_VERSION must be 22.05 or 25.11, not $SLURM_VERSION" >&2
        exit 2
        ;;
esac
CONF=$DIR/slurm.conf
HOST=$(hostname -s)
MYSQL_SOCK=$DIR/mysqld/mysqld.sock
START_TIMEOUT=${HPCPIPE_TESTBED_TIMEOUT:-90}
export SLURM_CONF=$CONF

say() { echo "testbed: $*"; }

die() {
    echo "testbed: ERROR: $*" >&2
    local f
    for f in "$DIR"/log/*.log; do
        [[ -s $f ]] || continue
        echo "---- tail of $f" >&2
        tail -n 15 "$f" >&2
    done
    exit 1
}

pidfile() {
    case $1 in
        mysqld) echo "$DIR/mysqld/mysqld.pid" ;;  # written by mariadbd, which runs as mysql
        *) echo "$DIR/run/$1.pid" ;;
    esac
}

# Prints the pid of daemon $1 (name of its pid file) if that pid is alive and is the expected
# program; a stale pid file, or a pid reused by another program, counts as not running.
live_pid() {
    local name=$1 comm=${1%%-*} f pid state
    [[ $name == mysqld ]] && comm=mariadbd
    f=$(pidfile "$name")
    [[ -s $f ]] || return 1
    pid=$(tr -dc "0-9" 2>/dev/null <"$f") || return 1
    [[ -n $pid && -r /proc/$pid/stat ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm"* ]] || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $state != Z ]] || return 1
    echo "$pid"
}

# Runs a daemon detached from our stdio (the pytest fixture captures our output and would wait
# for EOF forever) and from our lock file descriptor.
spawn() {
    local log=$1
    shift
    setsid "$@" </dev/null >>"$log" 2>&1 9>&- &
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...
    local secs=$1 what=$2 i
    shift 2
    for ((i = 0; i < secs * 4; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.25
    done
    die "timed out after ${secs}s waiting for $what"
}

ensure_packages() {
    local cmd missing=0
    if [[ $SLURM_VERSION == 25.11 ]]; then
        built_2511_ok || cmd_build_2511
        return 0  # the build installs munge and mariadb-server too
    fi
    for cmd in slurmctld slurmd slurmdbd sacctmgr munged mariadbd mariadb-install-db mariadb; do
        command -v "$cmd" >/dev/null || missing=1
    done
    ((missing)) || return 0
    command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get to install it"
    say "installing slurm-wlm munge mariadb-server slurmdbd (1-2 minutes)"
    apt-get update -qq
    # invoke-rc.d "denied" messages are harmless: without a service manager nothing auto-starts.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        slurm-wlm munge mariadb-server slurmdbd >/dev/null
}

write_if_changed() {  # write_if_changed FILE MODE < content; returns 0 if the file changed
    local f=$1 mode=$2 tmp
    tmp=$(mktemp "$f.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f $f ]] && cmp -s "$tmp" "$f"; then
        rm -f "$tmp"
        return 1
    fi
    mv -f "$tmp" "$f"
    return 0
}

write_configs() {  # returns 0 if any config file changed
    local changed=1
    write_if_changed "$CONF" 644 <<EOF && changed=0
# Generated by tests/slurm/testbed.sh; edits are overwritten.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
${MUNGE_SOCK:+AuthInfo=socket=$MUNGE_SOCK
}StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# Declare more than the machine has (32 CPUs, 2 GPUs per node on a 2-core box).
SlurmdParameters=config_overrides
# No cgroups and no systemd here.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
# Memory is a consumable and is enforced by polling: a job over its --mem is killed.
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherParams=OverMemoryKill
JobAcctGatherFrequency=1
GresTypes=gpu
ReturnToService=2
JobRequeue=1
# Finished jobs stay visible to scontrol for 5 minutes.
MinJobAge=300
KillWait=10
InactiveLimit=0
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# Connections to slurmdbd are signed with AccountingStoragePass's munge socket, not AuthInfo's:
# without it sacctmgr and slurmctld use the machine's munged, which need not run.
${MUNGE_SOCK:+AccountingStoragePass=socket=$MUNGE_SOCK
}AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none
MailProg=/bin/true
NodeName=n[1-2] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$SLURMD_PORTS CPUs=32 RealMemory=64000 Gres=gpu:2 State=UNKNOWN
# Preemption as many sites run it: a job of a higher PriorityTier partition requeues the jobs in
# its way, which get SIGTERM (no warning signal: no send_user_signal) and GraceTime to stop.
# Only the tests that submit to "urgent" preempt anything.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=60
PartitionName=short Nodes=n[1-2] MaxTime=00:10:00 State=UP PriorityTier=1 GraceTime=60
PartitionName=urgent Nodes=n[1-2] MaxTime=00:10:00 State=UP PriorityTier=2
EOF
    # GRES needs character devices: a plain file is rejected, no File= gives a count of 0.
    write_if_changed "$DIR/gres.conf" 644 <<EOF && changed=0
NodeName=n[1-2] Name=gpu File=$DIR/dev/gpu[0-1]
EOF
    write_if_changed "$DIR/slurmdbd.conf" 600 <<EOF && changed=0
AuthType=auth/munge
${MUNGE_SOCK:+AuthInfo=socket=$MUNGE_SOCK
}DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    return $changed
}

prepare_dirs() {
    mkdir -p "$DIR"/{run,log,spool/ctld,spool/n1,spool/n2,dev,munge,mysqld}
    chmod 755 "$DIR"
    local i
    for i in 0 1; do
        if [[ ! -c $DIR/dev/gpu$i ]]; then
            rm -f "$DIR/dev/gpu$i"
            mknod "$DIR/dev/gpu$i" c 1 3
        fi
    done
    chown mysql:mysql "$DIR/mysqld"
    # n1/n2 are used as rendezvous addresses (MASTER_ADDR, dask scheduler) by the tests.
    local name
    for name in n1 n2 "$HOST"; do
        getent hosts "$name" >/dev/null || echo "127.0.0.1 $name" >>/etc/hosts
    done
}

MUNGE_OPTS=(${MUNGE_SOCK:+--socket=$MUNGE_SOCK})
munge_ok() { munge "${MUNGE_OPTS[@]}" -n </dev/null 2>/dev/null | unmunge "${MUNGE_OPTS[@]}" >/dev/null 2>&1; }

start_munged() {
    if munge_ok; then return 0; fi  # ours, or one the machine already runs: either will do
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge
    chown munge:munge /run/munge
    chmod 755 /run/munge
    # --force: as root munged would otherwise refuse a key directory owned by munge.
    if [[ -n $MUNGE_SOCK ]]; then
        # munged runs as root here (--force): its own socket folder, not /run/munge.
        chmod 755 "$DIR/munge"
    fi
    spawn "$DIR/log/munged.out" munged "${MUNGE_OPTS[@]}" --force --pid-file="$(pidfile munged)" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
    wait_for 20 "munged" munge_ok
}

mysql_cli() { mariadb --no-defaults --socket="$MYSQL_SOCK" -u root "$@"; }

start_mysqld() {
    if ! live_pid mysqld >/dev/null; then
        if [[ ! -d $DIR/mysql/mysql ]]; then
            say "creating the MariaDB data directory"
            rm -rf "$DIR/mysql"
            mariadb-install-db --no-defaults --user=mysql --datadir="$DIR/mysql" \
                --auth-root-authentication-method=socket >"$DIR/log/mysql-install.log" 2>&1 \
                || die "mariadb-install-db failed, see $DIR/log/mysql-install.log"
        fi
        rm -f "$MYSQL_SOCK"
        spawn "$DIR/log/mysqld.out" mariadbd --no-defaults --user=mysql \
            --datadir="$DIR/mysql" --socket="$MYSQL_SOCK" --pid-file="$(pidfile mysqld)" \
            --port=$MYSQL_PORT --bind-address=127.0.0.1 --skip-name-resolve \
            --log-error="$DIR/log/mysqld.log" --innodb-lock-wait-timeout=900
    fi
    wait_for 60 "MariaDB" mysql_cli -e "SELECT 1"
    mysql_cli <<'EOF'
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

sacctmgr_ok() { sacctmgr -n -P show cluster format=cluster; }

start_slurmdbd() {
    # slurmdbd takes no -f: it reads slurmdbd.conf beside $SLURM_CONF.
    live_pid slurmdbd >/dev/null || spawn "$DIR/log/slurmdbd.out" slurmdbd
    wait_for 60 "slurmdbd" sacctmgr_ok
    local user users=(root)
    [[ -n ${SUDO_USER:-} && ${SUDO_USER} != root ]] && users+=("$SUDO_USER")
    sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER" \
        || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    sacctmgr -n -P show account format=account | grep -qx default \
        || sacctmgr -i add account default cluster="$CLUSTER" >/dev/null
    for user in "${users[@]}"; do
        sacctmgr -n -P show user format=user | grep -qx "$user" \
            || sacctmgr -i add user "$user" account=default cluster="$CLUSTER" >/dev/null
    done
}

start_slurmctld() {
    live_pid slurmctld >/dev/null || spawn "$DIR/log/slurmctld.out" slurmctld -f "$CONF"
    wait_for 30 "slurmctld to answer scontrol ping" ctld_ok
}

# Clients retry a dead controller for many seconds: bound every call so a wait has a real deadline.
ctld_ok() { timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }

start_slurmd() {
    local n
    for n in n1 n2; do
        live_pid "slurmd-$n" >/dev/null || spawn "$DIR/log/slurmd-$n.out" slurmd -f "$CONF" -N "$n"
    done
}

# Both nodes registered and usable. Busy nodes (jobs of another test session) count as up.
# 25.11 appends "-" to a mixed node's %T while the backfill scheduler plans a pending job on it
# ("mixed-"; 22.05 prints "mixed"): still usable.
nodes_ok() {
    local states
    states=$(timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null | sed 's/-$//' | sort -u) || return 1
    [[ $(grep -cE '^n[12] (idle|mixed|allocated|completing|planned)$' <<<"$states") == 2 ]]
}

# Up = every daemon of ours alive (slurmctld would call a node with a dead slurmd idle for minutes),
# the controller answering and both nodes usable.
cluster_up() {
    local d
    for d in mysqld slurmdbd slurmctld slurmd-n1 slurmd-n2; do
        live_pid "$d" >/dev/null || return 1
    done
    munge_ok && ctld_ok && nodes_ok
}

wait_nodes() {
    local i resumed=0 deadline=$((SECONDS + START_TIMEOUT))
    for ((i = 0; SECONDS < deadline; i++)); do
        nodes_ok && return 0
        # A node left down or drained (by a test, or by a stop while jobs ran) with its slurmd
        # alive would otherwise stay so: bring it back once.
        if ((i > 2 && !resumed)) && timeout 10 sinfo -h -N -o '%T' | grep -qE 'down|drain'; then
            scontrol update NodeName=n[1-2] State=RESUME >/dev/null 2>&1 || true
            resumed=1
        fi
        sleep 0.5
    done
    timeout 10 sinfo -N -l >&2 || true
    die "nodes n1, n2 did not become idle within ${START_TIMEOUT}s"
}

cancel_leftover_jobs() {
    # slurmctld recovers the jobs of the cluster's last life from its state folder. Jobs still
    # there when no slurmd was alive were never ended by `stop` (a test run killed half-way): their
    # tests are gone, and a job recorded as running holds its nodes until its time limit, so every
    # new job pends. With a slurmd alive only the controller was down (a test restarts it, another
    # test session's jobs may be queued): its jobs are live and stay.
    local jobs
    live_pid slurmd-n1 >/dev/null || live_pid slurmd-n2 >/dev/null && return 0
    jobs=$(timeout 10 squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [[ -n ${jobs// /} ]]; then
        say "cancelling jobs left from an earlier run of the cluster: $jobs"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null || true
    fi
}

cmd_start() {
    [[ $EUID -eq 0 ]] || die "start must run as root (try: sudo -E bash $0 start)"
    local t0=$SECONDS
    ensure_packages
    mkdir -p "$DIR"
    exec 9>"$DIR/lock"
    flock 9
    prepare_dirs
    if write_configs; then
        if any_running; then
            say "configuration changed: restarting the cluster"
            stop_daemons
        fi
    elif cluster_up; then
        say "already running"
        print_hint
        return 0
    fi
    start_munged
    start_mysqld
    start_slurmdbd
    start_slurmctld
    cancel_leftover_jobs
    start_slurmd
    wait_nodes
    say "cluster $CLUSTER up in $((SECONDS - t0))s: nodes n1 n2, partitions debug (default), short, urgent"
    print_hint
}

print_hint() {
    echo "export SLURM_CONF=$CONF"
    # The nodes' GPUs are declared on character devices, not real: the train step, which refuses
    # to train on CPU where the allocation has GPUs CUDA cannot use, is told CPU is meant. Jobs
    # inherit it from the submitting shell (sbatch's default --export=ALL).
    echo "export HPCPIPE_ALLOW_CPU_ON_GPU_ALLOCATION=1"
    [[ $SLURM_VERSION == 22.05 ]] || echo "export PATH=$SLURM_PREFIX_2511/bin:$SLURM_PREFIX_2511/sbin:\$PATH"
}

DAEMONS=(slurmd-n2 slurmd-n1 slurmctld slurmdbd mysqld munged)  # in stop order

any_running() {
    local d
    for d in "${DAEMONS[@]}"; do
        live_pid "$d" >/dev/null && return 0
    done
    return 1
}

stop_daemons() {
    # Cancel jobs first: a job's slurmstepd outlives slurmd and would keep running user code.
    if ctld_ok; then
        local jobs
        jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
        if [[ -n ${jobs// /} ]]; then
            say "cancelling jobs: $jobs"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            local i
            for ((i = 0; i < 60; i++)); do
                [[ -z $(squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null) ]] && break
                sleep 0.5
            done
        fi
    fi
    local d pid i
    for d in "${DAEMONS[@]}"; do
        pid=$(live_pid "$d") || { rm -f "$(pidfile "$d")"; continue; }
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 120; i++)); do
            live_pid "$d" >/dev/null || break
            sleep 0.25
        done
        if live_pid "$d" >/dev/null; then
            say "$d (pid $pid) ignored SIGTERM for 30s: killing it"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
        fi
        rm -f "$(pidfile "$d")"
        say "stopped $d (pid $pid)"
    done
}

cmd_stop() {
    [[ $EUID -eq 0 ]] || die "stop must run as root"
    [[ -d $DIR ]] || { say "nothing to stop ($DIR does not exist)"; return 0; }
    exec 9>"$DIR/lock"
    flock 9
    stop_daemons
}

cmd_status() {
    local d pid rc=0
    for d in munged mysqld slurmdbd slurmctld slurmd-n1 slurmd-n2; do
        if pid=$(live_pid "$d"); then
            printf '%-10s up (pid %s)\n' "$d" "$pid"
        elif [[ $d == munged ]] && munge_ok; then
            printf '%-10s up (not started by the testbed)\n' "$d"
        else
            printf '%-10s down\n' "$d"
            rc=1
        fi
    done
    if ctld_ok; then
        sinfo -N -o '%N %P %T %c %m %G'
    fi
    print_hint
    return $rc
}

# ---- Slurm 25.11 from source -------------------------------------------------------------------
# The release source sits in shared/ beside the checkout (CI lays a copy there too).
SLURM_SRC_TARBALL=${HPCPIPE_SLURM_TARBALL:-$(realpath -m "$(dirname "${BASH_SOURCE[0]}")/../../../shared/slurm/slurm-25.11.7.tar.gz")}
SLURM_SRC_VERSION=25.11.7

# Two slurmd's on one host (n1, n2 share NodeHostname) need --enable-multiple-slurmd, as Debian's
# build has. Without it read_config.c logs "Duplicated NodeHostName" and drops n2 from its address
# table: slurmctld then cannot ping n2 ("_fwd_tree_get_addr: can't find address for host n2"), n2
# goes "Not responding"/DOWN after a few minutes and 2-node jobs pend forever. That error string
# ("Duplicated NodeHostName %s in the config file") is compiled only into builds without the
# option, so its presence marks a build to redo. The version comes from the installed header:
# Slurm clients fail without a slurm.conf, even for --version.
built_2511_ok() {
    [[ -x $SLURM_PREFIX_2511/bin/sbatch && -x $SLURM_PREFIX_2511/sbin/slurmctld ]] || return 1
    local num
    num=$(IFS=. && printf '0x%02x%02x%02x' $SLURM_SRC_VERSION)  # 25.11.7 -> 0x190b07
    grep -q "^#define SLURM_VERSION_NUMBER $num\$" \
        "$SLURM_PREFIX_2511/include/slurm/slurm_version.h" 2>/dev/null || return 1
    local lib=$SLURM_PREFIX_2511/lib/slurm/libslurmfull.so
    [[ -e $lib ]] && ! grep -q "Duplicated NodeHostName %s in the config file" "$lib"
}

# Builds $SLURM_SRC_TARBALL into $SLURM_PREFIX_2511 once per machine (4-7 min on 2 cores).
# It still needs Debian's munge and mariadb-server (ensure_packages) to run a cluster.
cmd_build_2511() {
    [[ $EUID -eq 0 ]] || die "build-25.11 must run as root"
    if built_2511_ok; then
        say "$SLURM_PREFIX_2511 already holds slurm $SLURM_SRC_VERSION"
        return 0
    fi
    [[ -r $SLURM_SRC_TARBALL ]] || die "no Slurm source tarball at $SLURM_SRC_TARBALL"
    local t0=$SECONDS pkgs=(build-essential pkg-config python3 libmunge-dev libmariadb-dev
        libjson-c-dev libhttp-parser-dev libjwt-dev libyaml-dev libdbus-1-dev libpam0g-dev
        liblz4-dev zlib1g-dev libreadline-dev munge mariadb-server)
    local p missing=()
    for p in "${pkgs[@]}"; do
        [[ $(dpkg-query -W -f '${db:Status-Abbrev}' "$p" 2>/dev/null) == ii* ]] || missing+=("$p")
    done
    if ((${#missing[@]})); then
        say "installing build dependencies: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
    fi
    local src=/var/tmp/slurm-$SLURM_SRC_VERSION-build
    local log=$src.log
    rm -rf "$src"
    mkdir -p "$src"
    tar xzf "$SLURM_SRC_TARBALL" -C "$src" --strip-components=1
    say "building slurm $SLURM_SRC_VERSION into $SLURM_PREFIX_2511 (log: $log; 4-7 min on 2 cores, once)"
    (
        cd "$src"
        ./configure --prefix="$SLURM_PREFIX_2511" --sysconfdir="$SLURM_PREFIX_2511/etc" \
            --disable-debug --enable-multiple-slurmd
        make -j"$(nproc)"
        make install
    ) >"$log" 2>&1 || die "build failed, see the end of $log: $(tail -n 5 "$log")"
    built_2511_ok || die "built, but $SLURM_PREFIX_2511 lacks slurm $SLURM_SRC_VERSION with --enable-multiple-slurmd"
    rm -rf "$src"
    say "built slurm $SLURM_SRC_VERSION in $((SECONDS - t0))s"
}

case ${1:-} in
    install) ensure_packages ;;
    env) print_hint ;;
    build-25.11) cmd_build_2511 ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *)
        echo "usage: [HPCPIPE_SLURM_VERSION=22.05|25.11] $0 install|build-25.11|start|stop|status|env   (state in $DIR)" >&2
        exit 2
        ;;
esac
