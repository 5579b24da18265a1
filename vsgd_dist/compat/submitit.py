"""submitit's private pieces the launcher relies on.

- `sbatch_script`: the sbatch script submitit would write for a job, without submitting it
  (the dry run shows it). submitit builds it in the private `_make_sbatch_string`; its public
  executor only writes it as part of a submission.
- `SUBMIT_MODULE`: the module sbatch runs on every task (`python -u -m submitit.core._submit
  FOLDER`), named where the dry run prints the script and where tools look for running tasks.

Written for submitit 1.5.4. It can go when submitit offers a public way to render a job's
script without submitting it; tests/test_compat.py fails when the pin changes, and the dry-run
tests compare the rendered script with what a real submission writes.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

WRITTEN_FOR = {"submitit": "1.5.4"}
SUBMIT_MODULE = "submitit.core._submit"


def submit_command(folder: Path) -> str:
    """What sbatch runs on every task: the string submitit's executor builds."""
    return f"{shlex.quote(sys.executable)} -u -m {SUBMIT_MODULE} {shlex.quote(str(folder))}"


def sbatch_script(folder: Path, array_size: int | None, **sbatch_parameters) -> str:
    """The script submitit would write for a job whose pickles and logs live in `folder`."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=submit_command(folder), folder=folder, map_count=array_size,
                               **sbatch_parameters)
