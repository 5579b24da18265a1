"""README's commands are real: the two commands at the top are what CI runs, and the
example command lines run as written (a training example is cut short with stop_at)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from launch.__main__ import main as launch

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_line(prefix: str) -> str:
    (line,) = [ln.strip() for ln in README.read_text().splitlines() if ln.strip().startswith(prefix)]
    return line


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S)[1].splitlines()
    assert [ln.split("#")[0].strip() for ln in first_block] == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    ci = (README.parent / ".ci/run").read_text()
    assert "bash scripts/test.sh" in ci


def test_dry_run_example_prints_the_sbatch_script(capsys):
    line = readme_line("python -m launch submit recipes/imagenet/resnet50_vsgd.yaml")
    assert launch(shlex.split(line)[3:]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --gpus-per-node=8" in out and "#SBATCH --ntasks-per-node=8" in out
    assert "dry run: nothing submitted" in out


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_override_example_runs(tmp_path):
    line = readme_line("python -m launch run recipes/demo.yaml --nproc 2 optimizer=adamw engine=fsdp2")
    args = [a for a in shlex.split(line)[3:] if not a.startswith("out=")]
    assert launch([*args, f"out={tmp_path / 'x'}", "train.stop_at=3", "train.progress=false"]) == 0
    assert (tmp_path / "x" / "checkpoints" / "step_00000003").is_dir()
