"""The docs' commands are real. Every command in a ```bash block of README.md or docs/*.md
matches one rule below: either a test in this file runs it (as written, or cut short: fewer
steps, a temporary out folder, a generated ImageNet-shaped folder for ~/imagenet, --dry-run
for a cluster this machine is not), or another test file runs it (named, and checked to
call it). A new command in the docs fails `test_every_docs_command_is_covered` until a rule
covers it. The two commands at the top of README.md are what CI runs."""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from launch.__main__ import main as launch

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^\s*```bash\n(.*?)^\s*```", text, re.S | re.M)


def doc_commands() -> list[tuple[str, str]]:
    """(file, command) for every command line of every bash block: continuation lines
    joined, comments and indentation dropped."""
    found = []
    for path in DOCS:
        for block in bash_blocks(path.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                command = " ".join(shlex.split(line, comments=True))
                if command:
                    found.append((path.relative_to(REPO).as_posix(), command))
    return found


@dataclass(frozen=True)
class Rule:
    """Commands matching `pattern` are run by `test` (a test of this file) or by the test file
    `elsewhere`, which must contain `marker` (how it calls them)."""

    pattern: str
    test: str = ""
    elsewhere: str = ""
    marker: str = ""


RULES = [
    Rule(r"bash scripts/test\.sh", elsewhere=".ci/run", marker="bash scripts/test.sh"),
    Rule(r"bash scripts/setup\.sh --dev", elsewhere="scripts/test.sh", marker="bash scripts/setup.sh --dev"),
    Rule(r"bash scripts/demo\.sh", elsewhere="tests/test_install.py", marker="bash scripts/demo.sh"),
    Rule(r"bash scripts/(wheelhouse\.sh \S+|setup\.sh --wheelhouse \S+)( --torch c(pu|uda))?",
         elsewhere="tests/test_install.py", marker="scripts/wheelhouse.sh"),
    Rule(r"python -m launch doctor( --cluster \S+)?", elsewhere="tests/test_doctor.py", marker='"doctor"'),
    Rule(r"python -m launch sweep recipes/demo\.yaml .* --local .*", elsewhere="tests/test_compare.py",
         marker='"sweep", "recipes/demo.yaml", "--local"'),
    Rule(r"bash slurm/local/(start|stop)\.sh.*", elsewhere="tests/slurm_helpers.py", marker="slurm/local/start.sh"),
    Rule(r"python -m launch (submit|sweep) \S+ --cluster local .*", elsewhere="tests/test_slurm.py",
         marker="--cluster"),
    Rule(r"python -m launch (status|tail|cancel) \S+", elsewhere="tests/test_slurm.py", marker='"tail"'),
    Rule(r"python -m launch run recipes/demo\.yaml --nproc 2 \S.*", test="test_demo_run_commands_run"),
    Rule(r"python -m launch compare \S+ .*--out \S+", test="test_compare_and_checkpoint_commands_run"),
    Rule(r"python -m launch checkpoint (inspect|convert) \S+.*", test="test_compare_and_checkpoint_commands_run"),
    Rule(r"python -m launch checkpoint upgrade \S+.*", elsewhere="tests/test_checkpoint.py", marker='"upgrade"'),
    Rule(r"python -m launch data write --src ~/imagenet .*", test="test_data_write_command_runs"),
    Rule(r"python -m launch run recipes/imagenet/\S+ --plan .*", test="test_plan_commands_run"),
    Rule(r"python -m launch submit recipes/imagenet/\S+ --cluster example-a100 .*", test="test_submit_commands_dry_run"),
]
"""Commands the docs show that no test here can run: the CUDA install needs a GPU machine
with the CUDA wheels (several GB). Each entry must still appear in the docs."""
NOT_RUN_HERE = {"bash scripts/setup.sh --torch cuda"}


def rule_of(command: str) -> Rule | None:
    matches = [r for r in RULES if re.fullmatch(r.pattern, command)]
    return matches[0] if matches else None


def commands_for(test_name: str) -> list[str]:
    found = list(dict.fromkeys(c for _, c in doc_commands() if (r := rule_of(c)) and r.test == test_name))
    assert found, f"no docs command is run by {test_name}"
    return found


def argv(command: str) -> list[str]:
    """The arguments after `python -m launch`."""
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "launch"], command
    return words[3:]


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    first_block = bash_blocks(README.read_text())[0].splitlines()
    assert [ln.split("#")[0].strip() for ln in first_block] == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    assert "bash scripts/test.sh" in (REPO / ".ci/run").read_text()
    assert len(README.read_text().splitlines()) < 200


def test_every_docs_command_is_covered():
    uncovered = [f"{path}: {command}" for path, command in doc_commands()
                 if command not in NOT_RUN_HERE and rule_of(command) is None]
    assert not uncovered, "docs commands no test runs (add a rule):\n" + "\n".join(uncovered)
    shown = {c for _, c in doc_commands()}
    assert NOT_RUN_HERE <= shown, NOT_RUN_HERE - shown
    for rule in RULES:
        if rule.elsewhere:
            assert rule.marker in (REPO / rule.elsewhere).read_text(), (rule.elsewhere, rule.marker)
        else:
            assert rule.test in globals(), rule.test


def test_docs_link_only_to_files_that_exist():
    """Links inside the repository resolve (results/ files are written by the benchmarks)."""
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" in target:
                continue
            resolved = (path.parent / target).resolve().relative_to(REPO).as_posix()
            assert (REPO / resolved).exists() or resolved.startswith("results/"), \
                f"{path.name} links to {target}"


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The demo's `launch run` commands, cut short: 2 steps each, in a temporary folder."""
    root = tmp_path_factory.mktemp("docs")
    runs = {}
    for command in commands_for("test_demo_run_commands_run"):
        args = argv(command)
        out = next((a.split("=", 1)[1] for a in args if a.startswith("out=")), None)
        assert out, f"give the run an out= folder: {command}"
        target = root / out
        cut = [a for a in args if not a.startswith(("out=", "max_steps="))]
        assert launch([*cut, f"out={target}", "max_steps=2", "train.progress=false"]) == 0, command
        assert (target / "checkpoints" / "step_00000002").is_dir()
        runs[out] = target
    return root, runs


@pytest.mark.dist
@pytest.mark.timeout(900)
def test_demo_run_commands_run(demo_runs):
    _, runs = demo_runs
    assert {"runs/demo/vsgd", "runs/demo/adamw"} <= set(runs)


def as_demo_paths(args: list[str], root: Path) -> list[str]:
    """Run folders of the ImageNet walk-through stand for the demo's (cut-short) runs."""
    stand_in = {"runs/resnet50_vsgd/run": "runs/demo/vsgd", "runs/resnet50_vsgd": "runs/demo/vsgd",
                "runs/resnet50_adamw": "runs/demo/adamw", "runs/compare/vsgd_adamw": "runs/demo"}
    return [str(root / stand_in.get(a, a)) if not a.startswith("-") and "/" in a or a.endswith(".pt") else a
            for a in args]


@pytest.mark.dist
@pytest.mark.timeout(600)
def test_compare_and_checkpoint_commands_run(demo_runs, capsys):
    root, _ = demo_runs
    for command in commands_for("test_compare_and_checkpoint_commands_run"):
        args = as_demo_paths(argv(command), root)
        if args[0] == "compare" and not all(Path(a).exists() for a in args[1:args.index("--out")]):
            pytest.fail(f"{command}: compares runs no docs command makes")
        assert launch(args) == 0, command
        out = capsys.readouterr().out
        if args[:2] == ["checkpoint", "inspect"]:
            assert "step" in out
        if "--out" in args:
            assert Path(args[args.index("--out") + 1]).exists(), command


@pytest.mark.dist
@pytest.mark.timeout(600)
def test_data_write_command_runs(tmp_path):
    src = tmp_path / "imagenet"
    for split, per_class in (("train", 3), ("val", 1)):
        for label in ("n01440764", "n01443537"):
            (src / split / label).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (40 + 8 * i, 32), (60 * i, 120, 200)).save(src / split / label / f"{i}.JPEG")
    for command in commands_for("test_data_write_command_runs"):
        args = [str(src) if a == "~/imagenet" else a for a in shlex.split(command.replace("~/imagenet", str(src)))][3:]
        out = tmp_path / args[args.index("--out") + 1]
        args[args.index("--out") + 1] = str(out)
        assert launch(args) == 0, command
        assert {"train.beton", "val.beton", "manifest.json"} <= {p.name for p in out.iterdir()}


@pytest.mark.dist
@pytest.mark.timeout(600)
def test_plan_commands_run(capsys):
    for command in commands_for("test_plan_commands_run"):
        assert launch(argv(command)) in (0, 1), command
        out = capsys.readouterr().out
        assert "optimizer state" in out and "activations" in out, out


def test_submit_commands_dry_run(tmp_path, capsys, monkeypatch):
    """Submissions to the example GPU cluster, with --dry-run (nothing is queued here)."""
    monkeypatch.chdir(tmp_path)  # job folders of a dry run land here, not in the checkout
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    for command in commands_for("test_submit_commands_dry_run"):
        args = argv(command)
        assert launch([*args, "--dry-run"] if "--dry-run" not in args else args) == 0, command
        out = capsys.readouterr().out
        nodes, gpus = args[args.index("--nodes") + 1], args[args.index("--gpus-per-node") + 1]
        assert f"#SBATCH --nodes={nodes}" in out and f"#SBATCH --gpus-per-node={gpus}" in out, out
        assert f"#SBATCH --ntasks-per-node={gpus}" in out
        assert "dry run: nothing submitted" in out
