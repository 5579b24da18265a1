"""Command line: run recipes locally or on SLURM, write data, compare runs."""
import os

# Every run goes through this package (launch run, its ranks, and each SLURM task, which
# imports launch.job before the trainer), so numba reads this before its first import.
# With OpenCV's libtbb present numba picks TBB, and a task pinned to one CPU whose trainer
# runs in a worker thread then hangs at exit in TBB's teardown; OpenMP does not.
os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")
