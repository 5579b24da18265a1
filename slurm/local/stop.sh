#!/usr/bin/env bash
# Stop the one-machine cluster started by start.sh: cancel its jobs (their processes belong
# to slurmstepd, not to the daemons), then end each daemon by the PID in its pid file.
#
#   bash slurm/local/stop.sh [FOLDER]      (default: <repo>/.slurm-local)
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
D=${1:-$REPO/.slurm-local}
PIDS="$D/pid"
export PATH="/usr/sbin:/sbin:$PATH"
[[ -d "$D" ]] || { echo "slurm-local: nothing under $D"; exit 0; }

# A pid file's process runs (a zombie does not count: PID 1 may reap the daemons late).
running() { [[ -r /proc/$1/stat ]] && [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]; }
alive() { [[ -s "$1" ]] && running "$(cat "$1")"; }

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
stop_pid "$PIDS/slurmd.pid" slurmd
stop_pid "$PIDS/slurmctld.pid" slurmctld
stop_pid "$PIDS/slurmdbd.pid" slurmdbd
stop_pid "$PIDS/mariadbd.pid" mariadbd
stop_pid "$PIDS/munged.pid" munged
rm -f "$D/env"  # launch --cluster local now says the cluster is not running
echo "slurm-local: stopped (state kept under $D)"
