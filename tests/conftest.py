import os

import pytest

# Keep every test process to one intra-op thread: the machines have 2 cores and the
# distributed tests start several ranks at once.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SLURM_MODULES = {"test_slurm.py", "test_multinode.py"}
"""Tests that skip when no SLURM cluster can start here; CI must run them."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skipped SLURM test fails: CI machines are set up to run them, so a
    skip there means the cluster broke, not that it is missing."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true" and item.path.name in SLURM_MODULES:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where the SLURM tests must run: {reason}"


@pytest.fixture(autouse=True)
def cancel_jobs_left_by_a_test(request):
    """A failed SLURM test must not leave a long job holding the cluster's CPUs."""
    yield
    if "cluster" in request.fixturenames:
        request.getfixturevalue("cluster").cancel_submitted()
