"""A gradient transform registered from outside the package (tests/toy_transform.py, Gaussian
gradient noise) gets its recipe section, trains on zero, fsdp2 and ddp through `launch run`,
shows its own columns in `launch compare`, and its checkpointed state reshards (2 ranks -> 1)
bit for bit; the package's files name no transform but their own registry."""
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
    from vsgd_dist.engines import engine_class
    from vsgd_dist.train.checkpoint import open_checkpoint

    meta, read = open_checkpoint(checkpoint)
    full = engine_class(meta["engine"]).grad_state_full(lambda r: read(r)["engine"], meta)["grad_noise/noise_sum"]
    return {name: tensor.clone() for name, tensor in full.items()}


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


@pytest.mark.timeout(900)
def test_a_transform_registered_outside_trains_compares_and_reshards(tmp_path):
    runs = {}
    for engine in ENGINES:
        out = runs[engine] = tmp_path / engine
        first = launch_run(out, 2, f"engine={engine}", "max_steps=6", "train.stop_at=4")
        assert first.returncode == 0, first.stderr[-3000:]
        saved = consolidated_noise(out / "checkpoints" / "step_00000004")
        # Resumed on 1 rank with nothing left to train, the state is saved again in that layout.
        again = launch_run(out, 1, f"engine={engine}", "max_steps=4")
        assert again.returncode == 0, again.stderr[-3000:]
        resaved = consolidated_noise(out / "checkpoints" / "step_00000004")
        assert saved.keys() == resaved.keys() and all(torch.equal(saved[k], resaved[k]) for k in saved), engine
        assert sum(float(v.double().square().sum()) for v in saved.values()) > 0
        finished = launch_run(out, 1, f"engine={engine}", "max_steps=6")
        assert finished.returncode == 0 and "completed at step 6" in finished.stdout, finished.stderr[-3000:]
        noised = scalars(out, "grad_noise/noised_steps")
        assert noised == {2: 2.0, 4: 4.0, 6: 6.0}, (engine, noised)  # its plain values came back too
        sigma = scalars(out, "grad_noise/sigma")
        assert sigma[6] == pytest.approx(0.01 / 6**0.55, rel=1e-6)  # sigma of step 5 (0-based), logged after it

    compared = launch("compare", *(str(p) for p in runs.values()), "--out", str(tmp_path / "report"))
    assert compared.returncode == 0, compared.stderr[-3000:]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| noise added (steps) | noise sum of squares |" in report
    for engine in ENGINES:
        row = next(line for line in report.splitlines() if line.startswith(f"| vsgd + gradient noise 0.01 ({engine},"))
        assert re.search(r"\| 6 \| [0-9.e+-]+ \|$", row), row


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
