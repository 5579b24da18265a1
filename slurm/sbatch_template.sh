#!/bin/bash
# Plain sbatch script for users who do not want submitit: srun starts one task per GPU (or
# per CPU rank) and every task runs the same command with torch.distributed's env:// variables
# set from SLURM's, so no launcher process (torchrun, mp.spawn) is needed:
#   RANK=$SLURM_PROCID  LOCAL_RANK=$SLURM_LOCALID  WORLD_SIZE=$SLURM_NTASKS
#   MASTER_ADDR=<first node of the job>  MASTER_PORT=20000 + job id % 20000 (same on requeue)
#
# Submit from the repository root (it is put on PYTHONPATH):
#   sbatch [sbatch options] slurm/sbatch_template.sh RECIPE [key=value ...]
#       -> each task runs: python -m launch run RECIPE --from-env [key=value ...]
#          (--from-env: join the group the variables above describe, start no ranks)
#   sbatch [sbatch options] slurm/sbatch_template.sh -- COMMAND [ARGS ...]
#       -> each task runs COMMAND with the same variables
# GPU nodes, one task per GPU, e.g. two 8-GPU nodes:
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=12 \
#          --partition=gpu --time=1-00:00:00 slurm/sbatch_template.sh recipes/resnet50.yaml
# Command-line options override the #SBATCH defaults below.
#
# USR2 reaches every task 120 s before the time limit. `python -m launch submit` turns it
# into a step-exact checkpoint and a requeue. Here `launch run --from-env` turns USR2, and
# scancel's SIGTERM, into the same step-exact checkpoint and ends (as `launch cancel` does for
# a submitted job); it does not requeue: resubmit the same line to resume from the checkpoint.
# A COMMAND of your own only saves if it handles USR2/SIGTERM itself.
#SBATCH --job-name=vsgd
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --signal=USR2@120
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

# Site setup (module loads, conda/venv activation) goes here, e.g.:
#   module load cuda/12.4 nccl
PYTHON=${PYTHON:-python}
export PYTHONPATH="$SLURM_SUBMIT_DIR${PYTHONPATH:+:$PYTHONPATH}"

if [[ ${1:-} == "--" ]]; then
  shift
  cmd=("$@")
elif (($#)); then
  cmd=("$PYTHON" -m launch run "$1" --from-env "${@:2}")
else
  echo "usage: sbatch [options] $0 RECIPE [key=value ...] | -- COMMAND [ARGS ...]" >&2
  exit 2
fi

mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
export MASTER_ADDR=${hosts[0]}
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export WORLD_SIZE=$SLURM_NTASKS
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}
echo "sbatch_template: $WORLD_SIZE tasks on ${hosts[*]}, master $MASTER_ADDR:$MASTER_PORT:$(printf ' %q' "${cmd[@]}")"

# Single quotes: RANK/LOCAL_RANK are expanded by each task's own shell, not here.
srun --kill-on-bad-exit=1 bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID; exec "$@"' \
  task "${cmd[@]}"
