import argparse
import os
from pathlib import Path

import pytest

# Keep every test process to one intra-op thread: the machines have 2 cores and the
# distributed tests start several ranks at once.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SLURM_MODULES = {"test_slurm.py", "test_multinode.py", "test_chaos.py"}
"""Tests that need a local SLURM cluster (the slurm lane)."""
CI_MUST_RUN = SLURM_MODULES
"""SLURM tests that skip when no cluster can start here; CI must run them."""
BESIDE_SLURM = {"test_recipes.py", "test_ivon_engines.py", "test_install.py"}
"""Modules that run in the slurm lane's pytest process when scripts/test.sh runs everything
(`--stream=slurm`): the SLURM tests leave the CPUs idle while they wait on the scheduler, and
with these the two processes end at about the same time."""
GPU_FOLDER = Path(__file__).resolve().parent / "gpu"
LANES = {
    "unit": "one process, seconds: what a developer runs after each change (scripts/test.sh --fast)",
    "dist": "starts processes (ranks, the launcher, the CLI in a subprocess)",
    "slurm": "needs the local SLURM cluster (slurm/local/start.sh)",
    "gpu": "needs CUDA (tests/gpu; skipped without a GPU)",
}
"""Every test is in exactly one lane. A test is `unit` unless it says otherwise: `dist` with
`@pytest.mark.dist` (or a module's `pytestmark`); the modules in SLURM_MODULES are `slurm`,
those in tests/gpu `gpu`. `pytest --lane=NAME` runs one lane (`--lane=unit,dist` several; no
--lane runs them all). Write the `=`: with a space, pytest takes a name that is also a folder
(`slurm`) for a path to collect and never reads this file's options."""


def pytest_addoption(parser):
    parser.addoption("--stream", choices=("slurm", "others"),
                     help="scripts/test.sh's two processes: the slurm lane and BESIDE_SLURM, or every other test")
    parser.addoption("--lane", type=lanes, help="run only these lanes of tests, comma-separated (see tests/conftest.py)")


def lanes(value: str) -> set[str]:
    chosen = set(value.split(","))
    if not chosen <= set(LANES):
        raise argparse.ArgumentTypeError(f"unknown lane {sorted(chosen - set(LANES))}; lanes are {', '.join(LANES)}")
    return chosen


def pytest_configure(config):
    for lane, what in LANES.items():
        config.addinivalue_line("markers", f"{lane}: {what}")


def lane_of(item) -> str:
    if item.path.name in SLURM_MODULES:
        return "slurm"
    if GPU_FOLDER in item.path.resolve().parents:
        return "gpu"
    marked = {m.name for m in item.iter_markers() if m.name in LANES}
    if len(marked) > 1:
        raise pytest.UsageError(f"{item.nodeid} is marked {sorted(marked)}: a test has one lane")
    return marked.pop() if marked else "unit"


def pytest_collection_modifyitems(config, items):
    """Mark every test with its lane and, with --lane or --stream, deselect the others."""
    wanted, stream = config.getoption("--lane"), config.getoption("--stream")
    kept, dropped = [], []
    for item in items:
        lane = lane_of(item)
        item.add_marker(lane)
        in_slurm_stream = lane == "slurm" or item.path.name in BESIDE_SLURM
        keep = (wanted is None or lane in wanted) and stream in (None, "slurm" if in_slurm_stream else "others")
        (kept if keep else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skipped SLURM test fails: CI machines are set up to run them, so a
    skip there means the cluster broke, not that it is missing."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true" and item.path.name in CI_MUST_RUN:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where the SLURM tests must run: {reason}"


@pytest.fixture(autouse=True)
def cancel_jobs_left_by_a_test(request):
    """A failed SLURM test must not leave a long job holding the cluster's CPUs."""
    yield
    if "cluster" in request.fixturenames:
        request.getfixturevalue("cluster").cancel_submitted()
