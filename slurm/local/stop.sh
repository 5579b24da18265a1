#!/usr/bin/env bash
# Stop the cluster started by start.sh: cancel its jobs (their processes belong to
# slurmstepd, not to the daemons), end each daemon by the PID in its pid file, then remove
# the network namespaces, veths and bridge recorded in FOLDER/net/created (multi-node).
# Nothing else is touched: `ip netns list`, `ip link` and `ps` are as before start.sh.
#
#   bash slurm/local/stop.sh [FOLDER]      (default: $VSGD_SLURM_LOCAL, else <repo>/.slurm-local)
set -uo pipefail
source "$(dirname "$0")/common.sh"
D=$(cluster_dir "${1:-}")
PIDS="$D/pid"
CREATED="$D/net/created"
[[ -d "$D" ]] || { echo "slurm-local: nothing under $D"; exit 0; }

if alive "$PIDS/slurmctld.pid"; then
  export SLURM_CONF="$D/slurm/slurm.conf"
  scancel --full --quiet --user=root 2>/dev/null
  for _ in $(seq 100); do
    [[ -z $(squeue -h -t RUNNING,COMPLETING,CONFIGURING -o %i 2>/dev/null) ]] && break
    sleep 0.2
  done
fi

stop_pid() {  # pid file, name: TERM, wait up to 10 s, then KILL
  local file=$1 name=$2 pid
  alive "$file" || { rm -f "$file"; return 0; }
  pid=$(cat "$file")
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 100); do running "$pid" || break; sleep 0.1; done
  if running "$pid"; then
    echo "slurm-local: $name ($pid) ignored SIGTERM, killing it"
    kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$file"
}
for f in "$PIDS"/slurmd-*.pid; do [[ -e $f ]] && stop_pid "$f" "$(basename "$f" .pid)"; done
stop_pid "$PIDS/slurmctld.pid" slurmctld
stop_pid "$PIDS/slurmdbd.pid" slurmdbd
stop_pid "$PIDS/mariadbd.pid" mariadbd
stop_pid "$PIDS/munged.pid" munged
rm -f "$D/env"  # launch --cluster local now says the cluster is not running

# Network objects, newest first. A namespace lives on while a process is inside it, so
# whatever is left in one of ours (a task whose slurmstepd was killed) is killed first.
if [[ -s $CREATED ]]; then
  tac "$CREATED" | while read -r kind name; do
    case $kind in
      netns)
        if [[ -e /run/netns/$name ]]; then
          pids=$(ip netns pids "$name" 2>/dev/null)
          [[ -z $pids ]] || kill -KILL $pids 2>/dev/null
          ip netns del "$name"
        fi ;;
      veth|bridge) ! ip link show "$name" >/dev/null 2>&1 || ip link del "$name" ;;
    esac
  done
  rm -f "$CREATED"
fi
echo "slurm-local: stopped (state kept under $D)"
