"""The command line as a user meets it: one line for every bad path, hints by meaning for
keys from other code bases, cluster profiles from anywhere, the dry run's summary, `launch
eval`, a resumed run saying so, and the comparison plots. The SLURM side (submit's data
check, cancel with a checkpoint, status of a failed job, a job's recorded cluster) is in
test_slurm.py, on a real cluster."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from launch.__main__ import main as launch

REPO = Path(__file__).resolve().parents[1]
DEMO = "recipes/demo.yaml"
QUIET = ["train.progress=false"]


def one_line_error(capsys, argv: list[str]) -> str:
    """Run `python -m launch ARGV` in this process; it must fail with one line on stderr."""
    code = launch(argv)
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# --- one line for every bad path ------------------------------------------------------------
@pytest.fixture
def places(tmp_path) -> dict[str, str]:
    (tmp_path / "file").write_text("x\n")
    (tmp_path / "empty").mkdir()
    return {"file": str(tmp_path / "file"), "empty": str(tmp_path / "empty"), "missing": str(tmp_path / "missing"),
            "unwritable": "/proc/vsgd-dist-test/x"}  # no one, root included, creates folders in /proc


# command line (with {file}, {empty}, {missing}, {unwritable}) -> what the line must say
BAD_PATHS = {
    "run out=FILE": ("run recipes/demo.yaml out={file}", "out= {file} is a file"),
    "run out=FILE/sub": ("run recipes/demo.yaml out={file}/sub", "{file} is a file, so no folder"),
    "run out=UNWRITABLE": ("run recipes/demo.yaml out={unwritable}", "/proc/vsgd-dist-test"),
    "run a folder as recipe": ("run {empty}", "is a folder; give a YAML file"),
    "run a missing recipe": ("run {missing}", "does not exist"),
    "submit --out FILE": ("submit recipes/demo.yaml --cluster local --out {file}", "--out {file} is a file"),
    "submit --cluster FILE": ("submit recipes/demo.yaml --cluster {file}", "must be a mapping of profile fields"),
    "submit --cluster MISSING.yaml": ("submit recipes/demo.yaml --cluster {missing}.yaml", "does not exist"),
    "submit --cluster FOLDER": ("submit recipes/demo.yaml --cluster {empty}", "is not a file"),
    "sweep --out FILE": ("sweep recipes/demo.yaml --cluster local seed=0,1 --out {file}/a", "is a file"),
    "sweep --local --out FILE": ("sweep recipes/demo.yaml --local seed=0,1 --out {file}", "is a file"),
    "data write --out FILE": ("data write --src {empty} --out {file}", "--out {file} is a file"),
    "data write --out UNWRITABLE": ("data write --src {empty} --out {unwritable}", "/proc/vsgd-dist-test"),
    "data write --src MISSING": ("data write --src {missing} --out {empty}/d", "has neither train/ nor val/"),
    "compare FILE": ("compare {file}", "no run folders"),
    "compare MISSING": ("compare {missing}", "does not exist"),
    "compare --out FILE": ("compare {empty} --out {file}", "--out {file} is a file"),
    "checkpoint inspect FILE": ("checkpoint inspect {file}", "is a file"),
    "checkpoint convert MISSING": ("checkpoint convert {missing} --out {empty}/c.pt", "does not exist"),
    "checkpoint convert --out FILE/x": ("checkpoint convert {empty} --out {file}/c.pt", "holds no checkpoints"),
    "eval MISSING": ("eval {missing}", "does not exist"),
    "eval FILE": ("eval {file}", "is a file"),
    "eval FOLDER": ("eval {empty}", "holds no checkpoints"),
    "status FILE": ("status {file}", "is a file; give a job folder"),
    "status FOLDER": ("status {empty}", "has no job.json"),
    "tail MISSING": ("tail {missing}", "neither a job folder nor a job id"),
    "cancel FILE": ("cancel {file}", "is a file; give a job folder"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(BAD_PATHS))
def test_every_subcommand_with_a_bad_path_says_one_line(case, places, capsys):
    command, message = BAD_PATHS[case]
    line = one_line_error(capsys, shlex.split(command.format(**places)))
    assert message.format(**places) in line, line


@pytest.mark.timeout(60)
def test_a_job_whose_cluster_is_gone_is_one_line(tmp_path, capsys):
    (tmp_path / "job.json").write_text(json.dumps({"job_id": "7", "cluster": "local", "array": False, "points": [],
                                                   "slurm_conf": str(tmp_path / "gone" / "slurm.conf")}))
    for command in ("status", "tail", "cancel"):
        line = one_line_error(capsys, [command, str(tmp_path)])
        assert "the job's cluster is not running" in line and "gone" in line, line


# --- hints by meaning -------------------------------------------------------------------------
HINTS = {  # what users type, from other code bases -> the key the hint must name
    "optim.learning_rate=0.01": "optim.lr",
    "learning_rate=0.1": "optim.lr",
    "resolution=64": "data.end_res",
    "data.resolution=64": "data.end_res",
    "train.batch_size=8": "train.global_batch",
    "batch_size=8": "train.global_batch",
    "warmup_iters=10": "schedule.warmup_steps",
    "opt=adamw": "optim.name",
    "arch=resnet50": "model.name",
    "wd=0.05": "optim.weight_decay",
    "gradient_accumulation_steps=2": "train.accum_steps",
    "drop_path_rate=0.1": "model.drop_path",
    "smoothing=0.1": "train.label_smoothing",
    "train.num_epochs=3": "train.epochs",
    "train.max_step=5": "did you mean 'train.max_steps'",  # no meaning known: spelling
    "train.qqq=1": "the keys here are: train.accum_steps, ",  # neither: the section's keys
    "qqq=1": "the sections recipe, model, optim",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("override", list(HINTS))
def test_unknown_keys_get_a_hint_by_meaning_first(override, capsys, tmp_path):
    line = one_line_error(capsys, ["run", DEMO, override, f"out={tmp_path / 'r'}"])
    assert f"unknown recipe key {override.partition('=')[0]!r}" in line and HINTS[override] in line, line
    assert not (tmp_path / "r").exists()


@pytest.mark.timeout(60)
def test_recipe_file_keys_get_hints_by_meaning(tmp_path, capsys):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("epochs: 3\n")
    assert "unknown key 'epochs'; for 'epochs' use train.epochs" in one_line_error(capsys, ["run", str(recipe)])
    recipe.write_text("optim:\n  betas: [0.9, 0.99]\n")
    assert "use optim.adamw.beta1 and optim.adamw.beta2" in one_line_error(capsys, ["run", str(recipe)])


# --- cluster profiles and the dry run (no cluster needed: the profile is not the local one) ---
SITE = {"description": "a site", "partition": "gpu", "gpus_per_node": 8, "cpus_per_node": 96, "cpus_per_task": 12,
        "max_nodes": 4, "max_tasks_per_node": 8, "time_default": "1-02:30:00", "time_max": "2-00:00:00"}


@pytest.mark.timeout(120)
def test_profile_from_any_path_and_the_dry_run_summary(tmp_path, capsys):
    profile = tmp_path / "site" / "mine.yaml"
    profile.parent.mkdir()
    profile.write_text(yaml.safe_dump(SITE))
    job = tmp_path / "job"
    argv = ["submit", "recipes/imagenet/resnet50_vsgd.yaml", "--cluster", str(profile), "--nodes", "2", "--dry-run",
            "--out", str(job)]
    assert launch(argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "# dry run summary"
    summary = "\n".join(lines[:lines.index("")])
    assert f"cluster:      mine ({profile})" in summary
    assert "2 nodes x 8 GPUs = 16 ranks" in summary
    assert "global 1024 = 16 ranks x 64 images per rank per step (no accumulation" in summary
    assert "1 day 2 h 30 min (1-02:30:00)" in summary
    assert f"run folder:   {job / 'run'}" in summary and f"{job}/submitit/%j_0_log.err" in summary
    # the recipe says 8 GPUs; 16 halves each rank's images and leaves the LR alone
    assert re.search(r"written for 8 GPUs .* 16 ranks.* 64 images per step instead of 128; the peak LR does not "
                     r"change", summary), summary
    assert f"{REPO / 'data' / 'imagenet'}: CANNOT BE READ HERE" in summary and "--no-data-check" in summary
    assert "#SBATCH --gpus-per-node=8" in out and "# resolved recipe" not in out and not job.exists()

    assert launch([*argv, "--full"]) == 0
    full = capsys.readouterr().out
    assert "# resolved recipe" in full and f"out: {job / 'run'}" in full and "srun" in full

    # submitting it is refused before anything reaches sbatch: the data cannot be read
    line = one_line_error(capsys, argv[:-3] + ["--out", str(job)])
    assert "no manifest.json" in line and "--no-data-check" in line, line
    assert not job.exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("field", ["gpus_per_node", "cpus_per_node", "cpus_per_task"])
def test_a_profile_without_a_required_field_names_it(field, tmp_path, capsys):
    profile = tmp_path / "mine.yaml"
    profile.write_text(yaml.safe_dump({k: v for k, v in SITE.items() if k != field}))
    line = one_line_error(capsys, ["submit", DEMO, "--cluster", str(profile), "--dry-run"])
    assert f"{profile}: missing required field {field} (" in line and f"'{field}: N'" in line, line


# --- launch eval, and a resumed run says so -----------------------------------------------------
@pytest.mark.dist
@pytest.mark.timeout(600)
def test_eval_matches_training_and_a_resumed_run_says_so(tmp_path, capfd):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    common = ["run", DEMO, f"out={run}", *QUIET, "train.global_batch=32", "data.minival=100", "train.ema_decay=0.9",
              "max_steps=4"]
    assert launch([*common, "train.stop_at=2"]) == 0  # stopped: saved, not validated
    capfd.readouterr()
    assert launch(common) == 0  # the ranks' output reaches the file descriptors
    assert f"trainer: resumed from step 2 ({run / 'checkpoints' / 'step_00000002'})" in capfd.readouterr().err

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Tensors("run/resumed/text_summary")] == [2]
    # a 4-step run logs every step whatever train.log_every (10 in the demo) says
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    trained = {tag: acc.Scalars(tag)[-1].value for tag in ("val/top1", "val/nll", "minival/top1", "val_ema/top1")}

    for extra, tag, name in (([], "val", "eval_val.json"), (["--split", "minival"], "minival", "eval_minival.json"),
                             (["--ema"], "val_ema", "eval_val_ema.json")):
        assert launch(["eval", str(run), *extra]) == 0
        out = capfd.readouterr().out
        saved = json.loads((run / "checkpoints" / "step_00000004" / name).read_text())
        assert saved["step"] == 4 and saved["top1"] == pytest.approx(trained[f"{tag}/top1"], abs=1e-6)
        assert f"top-1 {100 * saved['top1']:.2f}%" in out and "top-5" in out and "NLL" in out and "ECE" in out
    assert saved["images"] > 0
    val = json.loads((run / "checkpoints" / "step_00000004" / "eval_val.json").read_text())
    assert val["nll"] == pytest.approx(trained["val/nll"], rel=1e-5)


# --- the comparison plots -----------------------------------------------------------------------
def write_runs(root: Path) -> None:
    """Two optimizers x three seeds with known curves (TensorBoard files as the trainer writes them)."""
    from torch.utils.tensorboard import SummaryWriter

    from vsgd_dist.config import load_recipe

    for optimizer, top1 in (("vsgd", 0.90), ("adamw", 0.80)):
        for seed in range(3):
            run = root / f"{optimizer}-{seed}"
            run.mkdir(parents=True)
            cfg = load_recipe(DEMO, [f"optimizer={optimizer}", f"seed={seed}", f"out={run}"]).to_dict()
            (run / "recipe.yaml").write_text(yaml.safe_dump(cfg))
            writer = SummaryWriter(str(run / "tb"))
            for step in (2, 4, 6):
                writer.add_scalar("train/loss", 1.0 / step + seed, step)
                writer.add_scalar("train/images_per_s", 100.0, step)
            writer.add_scalar("val/top1", top1 + seed / 100, 6)
            writer.close()


@pytest.mark.timeout(120)
def test_compare_plots_the_mean_over_seeds_with_a_band_in_percent(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vsgd_dist.report import BAND, _mean_band, _styles, find_runs, group_runs, load_run

    write_runs(tmp_path / "runs")
    assert launch(["compare", str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    assert {p.name for p in (tmp_path / "report").glob("*.png")} == {"train_loss.png", "val_top1.png",
                                                                       "train_images_per_s.png"}
    groups = group_runs([load_run(p) for p in find_runs([str(tmp_path / "runs")])])
    styles = _styles(groups)
    assert len({colour for colour, _ in styles.values()}) == 2  # one colour per optimizer
    fig, ax = plt.subplots()
    for label, members in groups.items():
        _mean_band(ax, [r.curves["val/top1"] for r in members], 100, *styles[label], label)
        _mean_band(ax, [r.curves["train/loss"] for r in members], 1, *styles[label], label)
    top1, loss = ax.lines[0], ax.lines[1]
    vsgd_first = "vsgd" in ax.lines[0].get_label()
    assert list(top1.get_ydata()) == pytest.approx([91.0 if vsgd_first else 81.0])  # mean of seeds, in percent
    assert list(loss.get_xdata()) == [2, 4, 6] and list(loss.get_ydata()) == pytest.approx([1.5, 1.25, 1 / 6 + 1])
    band = ax.collections[1].get_paths()[0].vertices[:, 1]  # the loss band: min (seed 0) to max (seed 2)
    assert band.min() == pytest.approx(1 / 6) and band.max() == pytest.approx(2.5)
    assert all("mean of 3 seeds" in line.get_label() for line in ax.lines)
    assert "min-max" in BAND
    plt.close(fig)


# --- the sbatch template's path: launch run --from-env under srun --------------------------------
@pytest.mark.dist
@pytest.mark.timeout(300)
def test_from_env_stops_with_a_checkpoint_on_usr2(tmp_path):
    """SLURM sends USR2 before the time limit: a task of slurm/sbatch_template.sh saves at one
    step and ends, as a submitted job does before its requeue."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    from vsgd_dist.train.checkpoint import latest_checkpoint, read_meta

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "PYTHONPATH": str(REPO)}
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "launch", "run", DEMO, "--from-env", f"out={run}", *QUIET,
                             "train.global_batch=16", "max_steps=100000", "train.ckpt_every=2",
                             "train.stop_check_every=1"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while latest_checkpoint(run / "checkpoints") is None:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "no step 2"
            time.sleep(0.5)
        proc.send_signal(signal.SIGUSR2)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    step = read_meta(latest_checkpoint(run / "checkpoints"))["step"]
    assert f"launch run: stopped at step {step}" in out and step >= 2, (out, err)
