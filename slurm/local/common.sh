# Sourced by start.sh and stop.sh: the cluster folder, the names of what a cluster creates,
# and the pid-file checks both need.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PATH="/usr/sbin:/sbin:$PATH"

log() { printf 'slurm-local: %s\n' "$*"; }
die() { printf 'slurm-local: error: %s\n' "$*" >&2; exit 1; }

# The cluster folder: the argument, else $VSGD_SLURM_LOCAL, else <repo>/.slurm-local (the
# same rule as launch/slurm.py's local_cluster_dir).
cluster_dir() { printf '%s\n' "${1:-${VSGD_SLURM_LOCAL:-$REPO/.slurm-local}}"; }

# A pid file's process runs (a zombie does not count: PID 1 may reap the daemons late).
running() { [[ -r /proc/$1/stat ]] && [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]; }
alive() { [[ -s "$1" ]] && running "$(cat "$1")"; }

# Network objects are named after a hash of the folder, so that clusters in two folders
# never share a name; every name is recorded in $D/net/created before it is made, and
# stop.sh removes exactly those.
net_tag() { printf 'vs%s' "$(printf '%s' "$1" | md5sum | cut -c1-6)"; }
