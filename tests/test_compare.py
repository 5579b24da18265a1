"""The tuned comparison: the LR is chosen on minival and never on val, the paired interval is
the textbook one, and the local sweep resumes without rerunning finished points."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from launch.__main__ import main as launch
from vsgd_dist.report import Run, find_runs, group_runs, load_run, paired_difference, select_on_minival, t_interval

GOOD_LR, DEAD_LR = "0.03", "1e-06"  # trains in 40 steps / stays at its initialization
STEPS = 40


def run_with(seed: int, val_top1: float) -> Run:
    return Run(path=Path(f"seed{seed}"), label="x", seed=seed, curves={"val/top1": [(10, val_top1)]})


def test_paired_interval_on_a_constructed_example():
    # differences over seeds 0, 1, 2: 0.01, 0.02, 0.04 (seed 3 has no baseline: left out);
    # mean 0.07/3, deviations -0.04/3, -0.01/3, 0.05/3, so the sample sd is sqrt(0.0042/9/2);
    # t(0.975, 2 df) = 4.302653; half-width 4.302653 * sd / sqrt(3)
    mine = [run_with(0, 0.90), run_with(1, 0.92), run_with(2, 0.97), run_with(3, 0.50)]
    baseline = [run_with(0, 0.89), run_with(1, 0.90), run_with(2, 0.93)]
    mean, half, seeds = paired_difference(mine, baseline)
    sd = math.sqrt(7e-4 / 3)
    assert seeds == [0, 1, 2]
    assert mean == pytest.approx(0.07 / 3, abs=1e-12)
    assert half == pytest.approx(4.302653 * sd / math.sqrt(3), rel=1e-6)  # 0.037946
    assert half == pytest.approx(0.037946, abs=1e-6)
    # unpaired, the seed-to-seed spread of each side would swamp the difference
    assert t_interval([0.90, 0.92, 0.97])[2] > 2 * half


def write_poisoned_digits(folder: Path) -> None:
    """The demo's images and train labels; every val label moved to the next class, so the
    better a model, the worse its val top-1: val picks the LR that does not train."""
    from vsgd_dist.data.demo import SIDE, ArrayImages, digits_splits
    from vsgd_dist.data.manifest import Manifest
    from vsgd_dist.data.writer import WriteSettings, staged_write, write_beton

    splits = digits_splits()
    splits["val"] = ArrayImages(splits["val"].images, (splits["val"].labels + 1) % 10)
    settings = WriteSettings(max_resolution=None, write_mode="raw", num_workers=1)
    manifest = Manifest(source="digits, val labels shifted by one", classes=[str(d) for d in range(10)],
                        counts={name: len(s) for name, s in splits.items()}, settings={"side": SIDE})
    with staged_write(folder, manifest) as stage:
        for name, split in splits.items():
            write_beton(split, stage.path(name), settings)


def sweep_args(data: Path, out: Path) -> list[str]:
    return ["sweep", "recipes/demo.yaml", "--local", "--nproc", "1", "--parallel", "2", f"lr={DEAD_LR},{GOOD_LR}",
            f"max_steps={STEPS}", f"ckpt_every={STEPS // 2}", "log_every=10", "warmup_steps=0", "data.minival=300",
            f"data.data_dir={data}", "train.progress=false", "--out", str(out)]


@pytest.fixture(scope="module")
def poisoned_sweep(tmp_path_factory):
    """A finished 2-point local sweep (the dead and the good LR) on the poisoned digits."""
    root = tmp_path_factory.mktemp("poisoned")
    write_poisoned_digits(root / "data")
    assert launch(sweep_args(root / "data", root / "sweep")) == 0
    return root


@pytest.mark.dist
@pytest.mark.timeout(900)
def test_selection_follows_minival_not_the_poisoned_val(poisoned_sweep):
    groups = group_runs([load_run(p) for p in find_runs([str(poisoned_sweep / "sweep")])])
    by_lr = {f"{members[0].setting['optim.lr']:g}": members[0] for members in groups.values()}
    val_best = max(by_lr, key=lambda lr: by_lr[lr].final("val/top1"))
    minival_best = max(by_lr, key=lambda lr: by_lr[lr].final("minival/top1"))
    assert (minival_best, val_best) == (f"{float(GOOD_LR):g}", f"{float(DEAD_LR):g}")  # the trap is set
    assert select_on_minival(groups)["vsgd"].point == f"lr={GOOD_LR}"
    for members in groups.values():  # the choice does not even need val
        del members[0].curves["val/top1"]
    assert select_on_minival(groups)["vsgd"].point == f"lr={GOOD_LR}"


@pytest.mark.dist
@pytest.mark.timeout(900)
def test_local_sweep_resumes_without_rerunning_finished_points(poisoned_sweep, capsys):
    sweep = poisoned_sweep / "sweep"
    done, cut = sweep / f"lr={DEAD_LR}" / "run", sweep / f"lr={GOOD_LR}" / "run"
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (done / "tb").rglob("*") if p.is_file()}
    shutil.rmtree(cut / "checkpoints" / f"step_{STEPS:08d}")  # as if stopped after step STEPS / 2
    capsys.readouterr()
    assert launch(sweep_args(poisoned_sweep / "data", sweep)) == 0
    out = capsys.readouterr().out
    assert f"point lr={DEAD_LR}: finished before, skipped" in out
    assert f"point lr={GOOD_LR}: completed at step {STEPS}" in out
    assert before == {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (done / "tb").rglob("*") if p.is_file()}
    resumed = load_run(cut)
    assert resumed.curves["minival/top1"][-1][0] == STEPS
    logged = [step for step, _ in resumed.curves["train/loss"]]
    assert logged.count(10) == logged.count(20) == 1  # resumed at step 20, not started over
