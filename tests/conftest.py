import os

# Keep every test process to one intra-op thread: the machines have 2 cores and the
# distributed tests start several ranks at once.
os.environ.setdefault("OMP_NUM_THREADS", "1")
