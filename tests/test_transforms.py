"""A gradient transform registered from outside the package (tests/toy_transform.py, Gaussian
gradient noise) gets its recipe section, trains on zero, fsdp2 and ddp through `launch run`,
shows its own columns in `launch compare`, and its checkpointed state resumes on another world
size (2 ranks -> 1); the package's files name no transform. About 3 minutes per engine on 2
busy CPU cores (each launch compiles the data pipeline)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ["zero", "fsdp2", "ddp"]


def launch(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "VSGD_DIST_PLUGINS": "toy_transform",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def launch_run(out: Path, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    return launch("run", "recipes/demo.yaml", "--nproc", str(nproc), f"out={out}", "grad_noise.scale=0.01",
                  "train.progress=false", "train.log_every=2", "train.ckpt_every=0", *overrides)


def consolidated_noise(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The noise sum saved in `checkpoint` by every rank, put together by parameter name."""
    from vsgd_dist.train.checkpoint import read_full

    full = read_full(checkpoint)["grad_state"]["grad_noise/noise_sum"]
    return {name: tensor.clone() for name, tensor in full.items()}


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


@pytest.mark.dist
@pytest.mark.timeout(600)
@pytest.mark.parametrize("engine", ENGINES)
def test_a_transform_registered_outside_trains_compares_and_resumes_on_another_world_size(engine, tmp_path):
    """2 ranks stop at step 4; 1 rank resumes to step 6. Its plain values come back (the
    count of noised steps), and so does its per-element state: the noise sum at step 6 is the
    one saved at step 4 plus two steps' smaller noise (sigma decays), far closer to it than
    a sum started over would be."""
    out = tmp_path / engine
    first = launch_run(out, 2, f"engine={engine}", "max_steps=6", "train.stop_at=4")
    assert first.returncode == 0, first.stderr[-3000:]
    at_4 = consolidated_noise(out / "checkpoints" / "step_00000004")
    resumed = launch_run(out, 1, f"engine={engine}", "max_steps=6")
    assert resumed.returncode == 0 and "completed at step 6" in resumed.stdout, resumed.stderr[-3000:]
    at_6 = consolidated_noise(out / "checkpoints" / "step_00000006")
    assert at_4.keys() == at_6.keys() and all(at_4[k].shape == at_6[k].shape for k in at_4)
    saved = sum(float(v.double().square().sum()) for v in at_4.values())
    added = sum(float((at_6[k] - at_4[k]).double().square().sum()) for k in at_4)
    # expected added / saved: sum of (1 + t)^-1.1 over t = 4, 5 against t = 0..3, about 0.16; about 1.16 if lost
    assert saved > 0 and added < 0.5 * saved, (saved, added)
    # logged every step: a run this short logs at least 8 times (train.log_every shortened)
    assert scalars(out, "grad_noise/noised_steps") == {s: float(s) for s in range(1, 7)}
    assert scalars(out, "grad_noise/sigma")[6] == pytest.approx(0.01 / 6**0.55, rel=1e-6)  # step 5's, 0-based

    compared = launch("compare", str(out), "--out", str(tmp_path / "report"))
    assert compared.returncode == 0, compared.stderr[-3000:]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| noise added (steps) | noise sum of squares |" in report
    row = next(line for line in report.splitlines() if line.startswith(f"| vsgd + gradient noise 0.01 ({engine},"))
    assert re.search(r"\| 6 \| [0-9.e+-]+ \|$", row), row


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_its_recipe_keys_are_checked_in_the_launcher(tmp_path):
    bad = launch_run(tmp_path / "bad", 2, "grad_noise.scale=-1")
    assert bad.returncode == 2 and "grad_noise.scale=-1.0 must be a finite number >= 0" in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_the_package_names_no_transform_outside_its_own_module():
    """config.py, report.py and the trainer reach transforms through the registry only: no
    transform's name, section or log key appears in them."""
    for path in ("vsgd_dist/config.py", "vsgd_dist/report.py", "vsgd_dist/train/trainer.py"):
        text = (ROOT / path).read_text()
        assert not re.search(r"svrg|SVRG|grad_noise", text), path
