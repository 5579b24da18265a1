#!/usr/bin/env bash
# Start a real SLURM cluster on this machine (munged, MariaDB, slurmdbd, slurmctld and one
# slurmd per node) as root, without systemd: every config, socket, log, pid and state file
# lives under one folder, so that tests and users get a throwaway cluster that `stop.sh`
# fully removes. Idempotent: daemons already running are left alone, missing ones started.
#
#   bash slurm/local/start.sh [--nodes N] [--net A.B.C.0/24] [FOLDER]
#   source FOLDER/env                       (exports SLURM_CONF for sinfo/squeue/sacct)
#
# FOLDER: the argument, else $VSGD_SLURM_LOCAL, else <repo>/.slurm-local (launch --cluster
# local finds the cluster through the same rule).
#
# --nodes 1 (default, or $SLURM_LOCAL_NODES): one node `localhost` at 127.0.0.1.
# --nodes N > 1: N nodes node1..nodeN, each with its own network namespace, hostname and
#   address, so that jobs really span nodes: a bridge in the root namespace holds .1 of the
#   range (slurmctld's address), node i is .(10+i) behind a veth pair (eth0 inside its
#   namespace). Each slurmd runs in a private mount namespace where FOLDER/hosts is bound
#   over /etc/hosts (names -> these addresses; /etc itself is never touched). The bridge,
#   namespaces and veths are named vsXXXXXX* (XXXXXX from the folder) and recorded in
#   FOLDER/net/created for stop.sh.
# --net (or $SLURM_LOCAL_NET): the /24 the nodes use, default 10.213.0.0/24. It must be
#   free on this machine; two multi-node clusters at once need two ranges (and two ports).
#
# Ports (override through the environment): SLURM_LOCAL_CTLD_PORT (6817),
# SLURM_LOCAL_SLURMD_PORT (6818), SLURM_LOCAL_DBD_PORT (6819), SLURM_LOCAL_DB_PORT (3307).
set -euo pipefail
source "$(dirname "$0")/common.sh"

NODES=${SLURM_LOCAL_NODES:-1}
NET=${SLURM_LOCAL_NET:-10.213.0.0/24}
folder=
while (($#)); do
  case $1 in
    --nodes) NODES=${2:-}; shift 2 || die "--nodes needs a number" ;;
    --net) NET=${2:-}; shift 2 || die "--net needs a range such as 10.213.0.0/24" ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z $folder ]] || die "one FOLDER only, got $folder and $1"; folder=$1; shift ;;
  esac
done
[[ $NODES =~ ^[1-9][0-9]*$ ]] && ((NODES <= 200)) || die "--nodes must be 1 to 200, got '$NODES'"
[[ $NET =~ ^([0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3})\.0/24$ ]] || die "--net must be a /24 such as 10.213.0.0/24, got '$NET'"
PREFIX=${BASH_REMATCH[1]}
D=$(mkdir -p "$(cluster_dir "$folder")" && cd "$(cluster_dir "$folder")" && pwd)
CTLD_PORT=${SLURM_LOCAL_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_LOCAL_SLURMD_PORT:-6818}
DBD_PORT=${SLURM_LOCAL_DBD_PORT:-6819}
DB_PORT=${SLURM_LOCAL_DB_PORT:-3307}
[[ $(id -u) == 0 ]] || die "must run as root (the daemons run as root, without systemd)"
t0=$SECONDS

# --- packages ---------------------------------------------------------------------------
PKGS=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server iproute2)
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  # apt must never start the packaged services: we run our own instances under $D.
  [[ -e /usr/sbin/policy-rc.d ]] || { printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- layout -----------------------------------------------------------------------------
if ((NODES == 1)); then
  NAMES=(localhost) ADDRS=(127.0.0.1) CTLD_ADDR=127.0.0.1
else
  NAMES=() ADDRS=() CTLD_ADDR=$PREFIX.1
  for i in $(seq "$NODES"); do NAMES+=("node$i"); ADDRS+=("$PREFIX.$((10 + i))"); done
fi
mkdir -p "$D"/{munge/run,db/data,slurm/state,log,pid,net}
for n in "${NAMES[@]}"; do mkdir -p "$D/slurm/spool/$n"; done
chmod 700 "$D/munge"
chmod 755 "$D/munge/run"  # munged refuses a socket folder writable or unreadable by others
SOCK="$D/munge/run/munge.socket.2"
CONF="$D/slurm/slurm.conf"
PIDS="$D/pid"
HOSTS="$D/hosts"
CREATED="$D/net/created"
TAG=$(net_tag "$D")

if [[ -s $CONF ]] && alive "$PIDS/slurmctld.pid"; then
  have=$(grep -c '^NodeName=' "$CONF")
  ((have == NODES)) || die "a $have-node cluster runs under $D; stop it first: bash slurm/local/stop.sh $D"
fi
all_up=1
for p in munged mariadbd slurmdbd slurmctld "${NAMES[@]/#/slurmd-}"; do alive "$PIDS/$p.pid" || all_up=0; done
if ((all_up)); then
  log "already running under $D: $NODES node(s) (SLURM_CONF=$CONF)"
  exit 0
fi

# --- network: a bridge, and per node a namespace with a veth pair (multi-node only) -----
record() { grep -qxF "$*" "$CREATED" 2>/dev/null || echo "$*" >>"$CREATED"; }
if ((NODES > 1)); then
  BR=${TAG}br
  if ! ip link show "$BR" >/dev/null 2>&1; then
    used=$(ip -o -4 addr show | awk -v a="$CTLD_ADDR" 'index($4, a "/") == 1 {print $2}')
    [[ -z $used ]] || die "$CTLD_ADDR is already on interface $used; pick another range: --net A.B.C.0/24"
    record bridge "$BR"
    ip link add "$BR" type bridge
    ip addr add "$CTLD_ADDR/24" dev "$BR"
    ip link set "$BR" up
  fi
  for i in "${!NAMES[@]}"; do
    ns=$TAG-${NAMES[i]} veth=${TAG}n$((i + 1))
    [[ -e /run/netns/$ns ]] || { record netns "$ns"; ip netns add "$ns"; }
    if ! ip link show "$veth" >/dev/null 2>&1; then
      record veth "$veth"
      ip link add "$veth" type veth peer name eth0 netns "$ns"
      ip link set "$veth" master "$BR" up
      ip -n "$ns" addr add "${ADDRS[i]}/24" dev eth0
      ip -n "$ns" link set eth0 up
      ip -n "$ns" link set lo up
    fi
  done
  # What every node's /etc/hosts says: a node's own name must not map to 127.x (gloo would
  # then listen on loopback, out of reach of the other nodes).
  { echo "127.0.0.1 localhost"; echo "$CTLD_ADDR slurmctld"
    for i in "${!NAMES[@]}"; do echo "${ADDRS[i]} ${NAMES[i]}"; done; } >"$HOSTS"
fi

# --- munge ------------------------------------------------------------------------------
if [[ ! -s "$D/munge/munge.key" ]]; then
  dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none
fi
chmod 400 "$D/munge/munge.key"
if ! alive "$PIDS/munged.pid"; then
  rm -f "$SOCK" "$SOCK.lock"
  munged --force --socket="$SOCK" --key-file="$D/munge/munge.key" --pid-file="$PIDS/munged.pid" \
    --log-file="$D/log/munged.log" --seed-file="$D/munge/munged.seed"
fi

# --- MariaDB (slurmdbd's store; sacct reads job states from it) ---------------------------
DB_SOCK="$D/db/mariadbd.sock"
if [[ ! -d "$D/db/data/mysql" ]]; then
  mariadb-install-db --no-defaults --datadir="$D/db/data" --user=root --skip-test-db \
    --auth-root-authentication-method=socket >"$D/log/mariadb-install.log" 2>&1 \
    || die "mariadb-install-db failed, see $D/log/mariadb-install.log"
fi
if ! alive "$PIDS/mariadbd.pid"; then
  rm -f "$DB_SOCK"
  setsid mariadbd --no-defaults --datadir="$D/db/data" --socket="$DB_SOCK" --port="$DB_PORT" \
    --bind-address=127.0.0.1 --skip-name-resolve --user=root --pid-file="$PIDS/mariadbd.pid" \
    --log-error="$D/log/mariadbd.log" --innodb-buffer-pool-size=64M </dev/null >/dev/null 2>&1 &
  for _ in $(seq 100); do [[ -S "$DB_SOCK" ]] && break; sleep 0.2; done
  [[ -S "$DB_SOCK" ]] || die "MariaDB did not start, see $D/log/mariadbd.log"
  mariadb --no-defaults --socket="$DB_SOCK" -u root -e \
    "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
     GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
fi

# --- slurm configs ----------------------------------------------------------------------
# Nodes are described exactly as slurmd detects this machine; a mismatch would drain them.
LAYOUT=$(slurmd -C | head -1 | sed -E 's/^NodeName=[^ ]+ //')
cat >"$CONF" <<EOF
# Generated by slurm/local/start.sh: a $NODES-node cluster on one machine, for tests and local runs.
ClusterName=local
SlurmctldHost=localhost($CTLD_ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job restarts after ~12 s instead of ~121 s.
AuthInfo=socket=$SOCK,cred_expire=10
StateSaveLocation=$D/slurm/state
SlurmdSpoolDir=$D/slurm/spool/%n
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
# No cgroups here: track processes through /proc, bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Start a requeued job as soon as its credential wait ends, not at the next 30-60 s pass.
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
JobRequeue=1
ReturnToService=2
# Ranks that ignore SIGTERM (submitit bypasses it) are killed 5 s later, not 30 s.
KillWait=5
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# With a non-default munge socket, slurmctld reaches slurmdbd through this "password".
AccountingStoragePass=$SOCK
# Keep the job comment: launch submit stores the job folder there, for launch status ID.
AccountingStoreFlags=job_comment
EOF
if ((NODES > 1)); then
  # A node whose slurmd stops answering is set DOWN after 30 s instead of 300 s: its job
  # ends NODE_FAIL and is requeued onto the nodes left (JobRequeue=1).
  echo "SlurmdTimeout=30" >>"$CONF"
fi
for i in "${!NAMES[@]}"; do echo "NodeName=${NAMES[i]} NodeAddr=${ADDRS[i]} $LAYOUT State=UNKNOWN"; done >>"$CONF"
echo "PartitionName=debug Nodes=$(IFS=,; echo "${NAMES[*]}") Default=YES MaxTime=02:00:00 State=UP" >>"$CONF"
cat >"$D/slurm/slurmdbd.conf" <<EOF
# Generated by slurm/local/start.sh
AuthType=auth/munge
AuthInfo=socket=$SOCK
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$PIDS/slurmdbd.pid
LogFile=$D/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
chmod 600 "$D/slurm/slurmdbd.conf"  # slurmdbd refuses a config others can read
printf 'export SLURM_CONF=%q\n' "$CONF" >"$D/env"
export SLURM_CONF="$CONF"

# --- slurm daemons (each forks and writes its pid file) ---------------------------------
if ! alive "$PIDS/slurmdbd.pid"; then
  slurmdbd
  for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$DBD_PORT") 2>/dev/null && break; sleep 0.2; done
fi
alive "$PIDS/slurmctld.pid" || slurmctld
for i in "${!NAMES[@]}"; do
  name=${NAMES[i]}
  alive "$PIDS/slurmd-$name.pid" && continue
  if ((NODES == 1)); then
    slurmd -N "$name"
  else
    # Not `ip netns exec`: it remounts /sys, hiding /sys/fs/cgroup, and slurmd exits.
    nsenter --net="/run/netns/$TAG-$name" unshare --uts --mount --propagation private \
      sh -c 'mount --bind "$1" /etc/hosts && hostname "$2" && exec slurmd -N "$2"' sh "$HOSTS" "$name"
  fi
done

# --- wait until every node answers (idle, or running jobs) and accounting answers -------
for _ in $(seq 150); do
  up=$(sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2 ~ /^(idle|allocated|mixed|completing)$/' | wc -l)
  if ((up == NODES)) && sacct -n -X -S now-1minutes >/dev/null 2>&1; then
    log "running under $D: $NODES node(s) up, partition debug, ready in $((SECONDS - t0)) s (source $D/env for SLURM_CONF)"
    exit 0
  fi
  sleep 0.2
done
die "cluster did not become ready in 30 s ($up of $NODES nodes up); logs in $D/log"
