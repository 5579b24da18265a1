"""Faults and bad input: every way a run can break ends in one clear line, and no
run is lost, mixed up or orphaned. Real processes and real files throughout; the commands run
as `python -m launch ...` subprocesses, as a user types them. Refusals that start no process
also go through the launcher's main() in this process (`launch_here`), each family keeping a
subprocess case so that the real entry point stays covered.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from launch.clusters import LaunchError, load_profile, parse_time
from launch.slurm import add_request_arguments, build_spec

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[1]
GPU_PROFILE = "example-a100"  # not local: a dry run needs no cluster


def launch(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})


def launch_here(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """The same command through the launcher's main() in this process, as a CompletedProcess: for checks of
    a refusal's message and exit code, which start no process (seconds saved per command)."""
    from launch.__main__ import main

    argv, out, err = list(map(str, args)), io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's errors, as `python -m launch` exits with them
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
    return subprocess.CompletedProcess(["launch", *argv], code, out.getvalue(), err.getvalue())


def one_line_error(res: subprocess.CompletedProcess, code: int = 2) -> str:
    """The command failed with `code` and said so in exactly one line (no traceback)."""
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1, err
    return err


# --- item 12: control characters never reach an sbatch line ------------------------------
HOSTILE = "x\ntouch /tmp/pwned #"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("option", ["--account", "--qos", "--out"])
def test_control_characters_in_options_are_refused(tmp_path, option):
    value = str(tmp_path / HOSTILE) if option == "--out" else HOSTILE
    via = launch if option == "--account" else launch_here
    res = via("submit", "recipes/demo.yaml", "--cluster", GPU_PROFILE, "--dry-run", "--out", tmp_path / "job",
              option, value)
    err = one_line_error(res)
    assert f"{option} " in err and "control character(s) '\\n'" in err, err
    assert "touch /tmp/pwned" not in res.stdout


def request(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_request_arguments(parser)
    return parser.parse_args(["recipes/demo.yaml", "--cluster", "hostile", *argv])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("field", ["partition", "account", "qos", "constraint", "mem"])
def test_control_characters_in_profile_values_are_refused(tmp_path, field):
    profile = yaml.safe_load((REPO / "slurm/clusters" / f"{GPU_PROFILE}.yaml").read_text())
    profile[field] = HOSTILE
    if field == "partition":
        profile["partitions"] = [HOSTILE]
    (tmp_path / "hostile.yaml").write_text(yaml.safe_dump(profile))
    with pytest.raises(LaunchError, match=f"--{field} .*control character"):
        build_spec(load_profile("hostile", tmp_path), request(), "job")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("char", ["\r", "\t", "\x1b", "\x00", "\x85"])
def test_job_name_with_any_control_character_is_refused(char):
    profile = load_profile(GPU_PROFILE)
    with pytest.raises(LaunchError, match="--job-name .*control character"):
        build_spec(profile, request(), f"job{char}x")


# --- item 14: every SLURM time format -----------------------------------------------------
def test_every_slurm_time_format():
    cases = {"30": 30, "30:00": 30, "90:30": 91, "01:30:00": 90, "00:00:01": 1, "1-2": 1560, "1-02:30": 1590,
             "1-02:30:01": 1591, "2-0": 2880}
    assert {t: parse_time(t) for t in cases} == cases
    for bad in ["1h", "-5", "0", "00:00", "00:61:00", "1:60", "1-24", "1-02:60", "1:2:3:4", "1-", "٣٠", ""]:
        with pytest.raises(LaunchError, match="SLURM time|out of range|zero"):
            parse_time(bad)


@pytest.mark.timeout(120)
def test_submit_accepts_minutes_and_seconds(tmp_path):
    res = launch_here("submit", "recipes/demo.yaml", "--cluster", GPU_PROFILE, "--dry-run", "--out",
                      tmp_path / "job", "--time", "30:00")
    assert res.returncode == 0, res.stderr
    assert "#SBATCH --time=30" in res.stdout.splitlines()


# --- item 17: one notion of the run folder ------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("command,override", [("submit", "out"), ("submit", "train.out"), ("sweep", "out")])
def test_out_override_on_slurm_points_to_the_out_flag(tmp_path, command, override):
    grid = ["seed=0,1"] if command == "sweep" else []
    via = launch if (command, override) == ("submit", "out") else launch_here
    res = via(command, "recipes/demo.yaml", "--cluster", GPU_PROFILE, "--dry-run", *grid,
              f"{override}={tmp_path / 'x'}")
    err = one_line_error(res)
    assert f"as --out {tmp_path / 'x'} " in err, err
    assert not res.stdout


# --- item 15: compare groups by the whole recipe minus seed and out ------------------------
def fake_run(folder: Path, top1: float, **train) -> Path:
    """A run folder as `launch run` leaves it: recipe.yaml and TensorBoard events."""
    from vsgd_dist.config import RunConfig, save_config
    from vsgd_dist.metrics import RunLogger

    cfg = RunConfig()
    cfg.train.out = str(folder)
    for key, value in train.items():
        setattr(cfg.train, key, value)
    folder.mkdir(parents=True)
    save_config(cfg, folder / "recipe.yaml")
    logger = RunLogger(str(folder / "tb"), enabled=True)
    logger.scalars({"val/top1": top1, "train/loss": 1.0, "train/images_per_s": 100.0}, 10)
    logger.close()
    return folder


@pytest.mark.timeout(120)
def test_compare_never_averages_runs_with_different_recipes(tmp_path):
    fake_run(tmp_path / "short0", 0.5, max_steps=100, seed=0)
    fake_run(tmp_path / "short1", 0.7, max_steps=100, seed=1)
    fake_run(tmp_path / "long0", 0.9, max_steps=300, seed=0)
    res = launch("compare", tmp_path, "--out", tmp_path / "report")
    assert res.returncode == 0, res.stderr
    rows = {tuple(line.split(" | ")[:3]) for line in res.stdout.splitlines() if line.startswith("| vsgd")}
    assert rows == {("| vsgd (zero, resnet_tiny, lr 0.1, train.max_steps=100)", "2", "60.00 ± 14.14"),
                    ("| vsgd (zero, resnet_tiny, lr 0.1, train.max_steps=300)", "1", "90.00")}, res.stdout


# --- a real run with a checkpoint, shared by the checkpoint tests -------------------------
DEMO = ["recipes/demo.yaml", "train.progress=false", "train.log_every=1", "train.global_batch=16",
        "train.ckpt_every=0"]


def run(out: Path, *overrides: str, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    return launch("run", *DEMO, "--nproc", nproc, f"out={out}", *overrides, timeout=timeout)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """A finished 2-rank demo run of 4 steps (one checkpoint, step 4); copy it before changing it."""
    out = tmp_path_factory.mktemp("demo") / "run"
    res = run(out, "max_steps=4")
    assert res.returncode == 0, res.stderr
    return out


def checkpoint_of(run_dir: Path) -> Path:
    """The latest published checkpoint folder."""
    from vsgd_dist.train.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir / "checkpoints")


# --- item 10: one line instead of a traceback or a misleading message ---------------------
@pytest.mark.timeout(400)
@pytest.mark.parametrize("action", ["inspect", "convert"])
def test_checkpoint_commands_on_a_rank_file_name_its_folder(demo_run, tmp_path, action):
    rank_file = checkpoint_of(demo_run) / "__0_0.distcp"
    extra = ["--out", tmp_path / "c.pt"] if action == "convert" else []
    err = one_line_error((launch if action == "inspect" else launch_here)("checkpoint", action, rank_file, *extra))
    assert f"{rank_file} is one rank's file; give its checkpoint folder {rank_file.parent}" in err, err


@pytest.mark.timeout(400)
def test_convert_to_a_folder_is_refused_and_leaves_nothing(demo_run, tmp_path):
    (tmp_path / "out").mkdir()
    err = one_line_error(launch_here("checkpoint", "convert", demo_run, "--out", tmp_path / "out"))
    assert f"--out {tmp_path / 'out'} is a folder; give a file to write" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not any((tmp_path / "out").iterdir())


# --- items 5 and 6: data -----------------------------------------------------------------
def last_line_error(res: subprocess.CompletedProcess, code: int) -> str:
    """The command failed with `code`, printed no traceback, and ended with one error line."""
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    return res.stderr.strip().splitlines()[-1]


def image_folder(root: Path, splits=("train", "val"), classes=("a", "b"), per_class: int = 8) -> Path:
    """Noise images, 32 px, `per_class` per class and split."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def write_data(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return launch("data", "write", "--src", src, "--out", out, "--write-mode", "jpg", "--num-workers", "1", *extra)


def zero_jpeg(beton: Path, sample: int) -> None:
    """Overwrite one sample's JPEG payload with zeros, in place."""
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    columns = reader.metadata.dtype.names
    pointer = reader.metadata[columns[reader.field_names.index("image")]]["data_ptr"][sample]
    row = reader.alloc_table[reader.alloc_table["ptr"] == pointer][0]
    with open(beton, "r+b") as f:
        f.seek(int(row["ptr"]))
        f.write(bytes(int(row["size"])))


def run_on_data(data_dir: Path, out: Path) -> subprocess.CompletedProcess:
    return run(out, f"data.data_dir={data_dir}", "train.global_batch=8", "max_steps=4", nproc=1)


@pytest.fixture(scope="module")
def written_data(tmp_path_factory) -> Path:
    """`launch data write` of noise images (train and val, classes a and b), written once; copy it before
    changing it."""
    root = tmp_path_factory.mktemp("written")
    res = write_data(image_folder(root / "src"), root / "data")
    assert res.returncode == 0, res.stderr
    return root / "data"


# The corrupt train sample is checked by test_a_run_that_never_saved_does_not_claim_its_folder,
# whose failing run is that same run.
@pytest.mark.timeout(400)
@pytest.mark.parametrize("split,sample", [("val", 3)])
def test_corrupt_jpeg_inside_a_beton_names_the_sample_and_file(written_data, tmp_path, split, sample):
    shutil.copytree(written_data, tmp_path / "data")
    zero_jpeg(tmp_path / "data" / f"{split}.beton", sample)
    err = last_line_error(run_on_data(tmp_path / "data", tmp_path / "run"), 1)
    assert f"{tmp_path / 'data' / split}.beton: sample {sample} holds a corrupt JPEG" in err, err


@pytest.mark.timeout(400)
def test_overwrite_removes_the_splits_the_new_dataset_lacks(written_data, tmp_path):
    shutil.copytree(written_data, tmp_path / "data")  # as `data write` left it, with both splits
    old_val = (tmp_path / "data" / "val.beton").read_bytes()
    train_only = image_folder(tmp_path / "train_only", splits=("train",), classes=("a", "b", "c"))
    assert write_data(train_only, tmp_path / "data", "--overwrite").returncode == 0
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["manifest.json", "train.beton"]
    (tmp_path / "data" / "val.beton").write_bytes(old_val)  # a stray file is never read
    err = one_line_error(launch_here("run", *DEMO, "--nproc", 1, f"out={tmp_path / 'run'}",  # as run_on_data
                                     f"data.data_dir={tmp_path / 'data'}", "train.global_batch=8", "max_steps=4"))
    assert f"{tmp_path / 'data'}: the dataset has no val split (manifest.json lists train)" in err, err


# --- item 1: signals reach every rank; no rank outlives the launcher ----------------------
def logged_steps(run_dir: Path) -> int:
    """The last step whose train/loss TensorBoard holds (0 before the first)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return events.Scalars("train/loss")[-1].step if "train/loss" in events.Tags()["scalars"] else 0


def start_run(out: Path, *overrides: str) -> subprocess.Popen:
    """`launch run` of a long demo in the background; returns once its ranks completed 2 steps."""
    proc = subprocess.Popen([sys.executable, "-m", "launch", "run", *DEMO, "--nproc", "2", f"out={out}",
                             "max_steps=100000", *overrides], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 240
    while not (out / "tb").is_dir() or logged_steps(out) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(1)
    return proc


def children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]
              for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.timeout(400)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_stop_signal_saves_on_every_rank_and_says_where(tmp_path, sig):
    proc = start_run(tmp_path / "run")
    ranks = children(proc.pid)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    saved = checkpoint_of(tmp_path / "run")
    step = json.loads((saved / "meta.json").read_text())["step"]
    assert err.strip().splitlines()[-1] == (f"launch run: {sig.name} received: every rank stopped at step {step} "
                                            f"and saved it to {saved}; run the same command to resume"), err
    assert sorted(p.name for p in saved.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json"]
    assert gone(ranks, timeout=30)


# the ranks dying with a killed launcher: test_second_run_into_a_busy_folder_is_refused_naming_the_holder


# --- items 8, 10, 11: refused in the launcher, in one line --------------------------------
BAD_VALUES = {"tau1": ("optim.vsgd.tau1=1.5", "optim.vsgd: VSGD: invalid tau1=1.5"),
              "ghattg": ("optim.vsgd.ghattg=-5", "optim.vsgd: VSGD: invalid ghattg=-5"),
              "beta1": ("optimizer=adamw optim.adamw.beta1=1.5", "optim.adamw: Invalid beta parameter at index 0"),
              "num_workers": ("data.num_workers=4096", "data.num_workers=4096 is more than the")}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(BAD_VALUES))
@pytest.mark.parametrize("command", ["run", "submit", "sweep"])
def test_bad_values_fail_in_the_launcher(tmp_path, command, case):
    overrides, message = BAD_VALUES[case]
    slurm = {"run": [], "submit": ["--cluster", GPU_PROFILE, "--dry-run"],
             "sweep": ["--cluster", GPU_PROFILE, "--dry-run", "seed=0,1"]}[command]
    via = launch if case == "tau1" else launch_here  # each command's real entry point once
    err = one_line_error(via(command, "recipes/demo.yaml", *overrides.split(), *slurm,
                             *(["out=" + str(tmp_path / "run")] if command == "run" else [])))
    assert message in err, err
    assert not (tmp_path / "run").exists()


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


BAD_RECIPES = {  # name -> (recipe file content, or None for a folder; the expected error)
    "empty": ("# nothing but a comment\n", "is empty; start from a copy of recipes/demo.yaml"),
    "binary": (bytes(range(256)), "is not a text file; give a YAML recipe"),
    "folder": (None, "is a folder; give a YAML file"),
    "invalid yaml": ("train: {max_steps: 3\n", "is not valid YAML: expected ',' or '}'"),
    "base outside": ("base: /etc/passwd\n", "base '/etc/passwd' is neither in"),
    "base secret": ("base: ../secret/s.yaml\n", "base '../secret/s.yaml' is neither in"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_bad_recipe_files_are_one_line_errors(tmp_path, case):
    content, message = BAD_RECIPES[case]
    write(tmp_path / "secret" / "s.yaml", "train:\n  seed: 1\nsecret_token_xyz: 1\n")
    recipe = tmp_path / "mine" / "r.yaml"
    if content is None:
        recipe.mkdir(parents=True)
    else:
        write(recipe, content)
    err = one_line_error((launch if case == "empty" else launch_here)("run", recipe))
    assert message in err and "secret_token_xyz" not in err and "root:" not in err, err


@pytest.mark.timeout(60)
def test_base_next_to_the_recipe_or_in_recipes_is_allowed(tmp_path):
    write(tmp_path / "shared.yaml", "base: " + str(REPO / "recipes/demo.yaml") + "\ntrain:\n  seed: 7\n")
    write(tmp_path / "mine.yaml", "base: shared.yaml\n")
    res = launch("submit", tmp_path / "mine.yaml", "--cluster", GPU_PROFILE, "--dry-run", "--full")  # --full: the resolved recipe
    assert res.returncode == 0, res.stderr
    assert "  seed: 7\n" in res.stdout and "  name: resnet_tiny\n" in res.stdout


@pytest.mark.timeout(60)
def test_invalid_yaml_in_an_override_is_one_line(tmp_path):
    err = one_line_error(launch("run", "recipes/demo.yaml", "lr=[1", f"out={tmp_path / 'run'}"))
    assert "override 'lr=[1': the value is not valid YAML" in err, err


# --- items 3 and 10: damaged checkpoints and full disks are named -------------------------
def copy_run(demo_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(demo_run, tmp_path / "run")
    return tmp_path / "run"


def checkpoint_command(action: str, run_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """A resume runs the launcher; inspect runs `python -m launch`; convert, its main() in this process."""
    if action == "run":  # resume it
        return run(run_dir, "max_steps=6")
    if action == "inspect":
        return launch("checkpoint", action, run_dir)
    return launch_here("checkpoint", action, run_dir, "--out", tmp_path / "c.pt")


@pytest.mark.timeout(400)
@pytest.mark.parametrize("action", ["inspect", "convert", "run"])
def test_flipped_bytes_in_a_checkpoint_file_are_named(demo_run, tmp_path, action):
    run_dir = copy_run(demo_run, tmp_path)
    file = checkpoint_of(run_dir) / "__1_0.distcp"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside a tensor
    file.write_bytes(data)
    res = checkpoint_command(action, run_dir, tmp_path)
    err = last_line_error(res, 1) if action == "run" else one_line_error(res)
    assert f"{file} does not match the checksum meta.json recorded at save" in err, err
    assert not (tmp_path / "c.pt").exists()


def damage_data_pkl(folder: Path) -> Path:
    """Cut the pickle of one value (rank 0's trainer state) inside its DCP file in half, the
    file's length unchanged, and record the damaged file's checksum: only the unpickler can
    judge it. Returns the file."""
    import io
    import struct
    import zipfile

    from vsgd_dist.compat.torch import MetadataUnpickler

    with open(folder / ".metadata", "rb") as f:
        where = next(w for i, w in MetadataUnpickler(f).load().storage_data.items() if i.fqn == "trainer/rank0")
    file = folder / where.relative_path
    data = bytearray(file.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data[where.offset:where.offset + where.length]))) as blob:
        entry = next(info for info in blob.infolist() if info.filename.endswith("data.pkl"))
    header = where.offset + entry.header_offset  # its local header, then its bytes
    name_len, extra_len = struct.unpack("<HH", data[header + 26:header + 30])
    start = header + 30 + name_len + extra_len
    data[start + entry.file_size // 2:start + entry.file_size] = bytes(entry.file_size - entry.file_size // 2)
    file.write_bytes(data)
    meta = json.loads((folder / "meta.json").read_text())
    meta["sha256"][file.name] = hashlib.sha256(data).hexdigest()
    (folder / "meta.json").write_text(json.dumps(meta))
    return file


@pytest.mark.timeout(400)
@pytest.mark.parametrize("part,action", [("meta.json", "inspect"), ("meta.json", "convert"), ("meta.json", "run"),
                                         ("data.pkl", "convert"), ("data.pkl", "run")])  # inspect reads no pickle
def test_unreadable_meta_or_pickle_names_the_file(demo_run, tmp_path, part, action):
    run_dir = copy_run(demo_run, tmp_path)
    folder = checkpoint_of(run_dir)
    if part == "meta.json":
        (folder / "meta.json").write_text('{"step": 4, "world_')
        expected = f"{folder / 'meta.json'} is unreadable (JSONDecodeError"
    else:  # damaged with its checksum updated, which only the unpickler can judge
        expected = f"{damage_data_pkl(folder)} is not a readable checkpoint file"
    res = checkpoint_command(action, run_dir, tmp_path)
    err = last_line_error(res, 1) if action == "run" else one_line_error(res)
    assert expected in err, err


def limited_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-long write then fails with EFBIG
    return apply


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs folder (root only); yields (folder, mount) or skips."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.timeout(400)
def test_file_size_limit_while_saving_names_the_step_and_what_is_kept(demo_run, tmp_path):
    run_dir = copy_run(demo_run, tmp_path)
    res = subprocess.run([sys.executable, "-m", "launch", "run", *DEMO, "--nproc", "2", f"out={run_dir}",
                          "max_steps=6"], cwd=REPO, capture_output=True, text=True, timeout=300,
                         preexec_fn=limited_file_size(300_000), env={**os.environ, "PYTHONPATH": str(REPO)})
    err = last_line_error(res, 1)
    assert err.endswith(f"file too large writing step 6 to {run_dir / 'checkpoints' / 'step_00000006.tmp'}; "
                        f"step 4 kept"), err
    assert checkpoint_of(run_dir).name == "step_00000004"


@pytest.mark.timeout(400)
def test_full_disk_while_saving_names_the_step_and_what_is_kept(demo_run, small_tmpfs):
    run_dir = small_tmpfs / "run"
    shutil.copytree(demo_run, run_dir)
    ballast = shutil.disk_usage(small_tmpfs).free - 1_200_000  # the next checkpoint needs ~1.6 MB
    (small_tmpfs / "ballast").write_bytes(bytes(ballast))
    err = last_line_error(run(run_dir, "max_steps=6"), 1)
    assert err.endswith(f"no space left on device writing step 6 to {run_dir / 'checkpoints' / 'step_00000006.tmp'}"
                        f"; step 4 kept"), err
    assert checkpoint_of(run_dir).name == "step_00000004"


# --- items 13 and 9: what a resumed run may change ----------------------------------------
@pytest.mark.timeout(400)
def test_resume_may_change_engine_steps_workers_and_cadence(demo_run, tmp_path):
    run_dir = copy_run(demo_run, tmp_path)
    res = run(run_dir, "engine=ddp", "max_steps=6", "data.num_workers=2", "train.log_every=2", "train.ckpt_every=5",
              "train.keep_checkpoints=3")
    assert res.returncode == 0, res.stderr
    assert "completed at step 6" in res.stdout
    meta = json.loads((checkpoint_of(run_dir) / "meta.json").read_text())
    assert (meta["step"], meta["engine"]) == (6, "ddp")
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["train"]["max_steps"] == 6


@pytest.mark.timeout(200)
@pytest.mark.parametrize("override,key", [("seed=3", "train.seed"), ("optimizer=adamw", "optim.name"),
                                          ("train.global_batch=32", "train.global_batch"),
                                          ("data.minival=100", "data.minival")])
def test_resume_refuses_only_what_the_checkpoint_cannot_hold(demo_run, tmp_path, override, key):
    run_dir = copy_run(demo_run, tmp_path)
    if override == "seed=3":  # the real entry point once
        err = one_line_error(run(run_dir, "max_steps=4", override))
    else:
        err = one_line_error(launch_here("run", *DEMO, "--nproc", 2, f"out={run_dir}", "max_steps=4", override))
    assert f"holds a different run ({key}: " in err and f"resume it with {key}=" in err, err


@pytest.mark.timeout(600)
def test_a_run_that_never_saved_does_not_claim_its_folder(written_data, tmp_path):
    """Also the corrupt-JPEG check of a train sample (its failing run)."""
    shutil.copytree(written_data, tmp_path / "bad")
    zero_jpeg(tmp_path / "bad" / "train.beton", 5)
    run_dir = tmp_path / "run"
    err = last_line_error(run_on_data(tmp_path / "bad", run_dir), 1)  # fails in its first epoch, before a save
    assert f"{tmp_path / 'bad' / 'train'}.beton: sample 5 holds a corrupt JPEG" in err, err
    assert (run_dir / "recipe.yaml").exists() and not (run_dir / "checkpoints").exists()
    shutil.copytree(written_data, tmp_path / "good")
    res = run_on_data(tmp_path / "good", run_dir)  # the corrected command
    assert res.returncode == 0 and "completed at step 4" in res.stdout, res.stderr
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["data"]["data_dir"] == str(tmp_path / "good")


# --- item 2: one run per folder -----------------------------------------------------------
def published_steps(run_dir: Path) -> set[int]:
    return {int(p.name.removeprefix("step_")) for p in (run_dir / "checkpoints").glob("step_*")
            if p.is_dir() and not p.name.endswith(".tmp")}


@pytest.mark.timeout(900)
def test_second_run_into_a_busy_folder_is_refused_naming_the_holder(tmp_path):
    """One run serves three items: a second run into its folder is refused (item 2); killed with SIGKILL right
    after a checkpoint, the launcher takes its ranks with it (item 1) and every step logged up to that
    checkpoint is on disk (see test_a_run_killed_right_after_a_checkpoint...); its stale lock then lets the
    same folder run again (item 2)."""
    out = tmp_path / "run"
    proc = start_run(out, "train.ckpt_every=4")
    try:
        ranks = children(proc.pid)
        assert len(ranks) >= 2
        err = one_line_error(run(out, "max_steps=4"))
        assert f"run folder {out} is in use by pid {proc.pid} on {socket.gethostname()}" in err, err
        before, deadline = max(published_steps(out), default=0), time.monotonic() + 240
        while max(published_steps(out), default=0) == before:  # right after the next checkpoint
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint after the refusal"
            time.sleep(0.05)
        proc.kill()
        proc.wait(timeout=30)
        assert gone(ranks, timeout=30), [Path(f"/proc/{p}/cmdline").read_text() for p in ranks]
    finally:
        proc.kill()
        proc.communicate()
    saved = max(published_steps(out))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    assert set(range(1, saved + 1)) <= {e.step for e in events.Scalars("train/loss")}, saved
    res = run(out, f"max_steps={saved + 2}")  # the killed holder's lock is stale
    assert res.returncode == 0, res.stderr
    assert f"completed at step {saved + 2}" in res.stdout, res.stdout
    assert not (out / "run.lock").exists()


def write_lock(run_dir: Path, age_s: float, **holder) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / "run.lock"
    lock.write_text(json.dumps({"host": "node7", "pid": 1, "job_id": None, "started": "earlier", "token": "t",
                                **holder}))
    os.utime(lock, (time.time() - age_s,) * 2)


def test_lock_of_another_host_holds_until_its_heartbeat_stops(tmp_path, monkeypatch):
    from vsgd_dist.train.run_lock import STALE_S, RunLock, RunLocked

    write_lock(tmp_path, age_s=5)
    with pytest.raises(RunLocked, match="is in use by pid 1 on node7 "):
        RunLock(tmp_path).__enter__()
    write_lock(tmp_path, age_s=STALE_S + 1)  # its holder stopped touching it: gone
    with RunLock(tmp_path):
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / "run.lock").exists()
    write_lock(tmp_path, age_s=5, job_id="4242")  # the same SLURM job, requeued on another node
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with RunLock(tmp_path):
        assert json.loads((tmp_path / "run.lock").read_text())["job_id"] == "4242"


@pytest.mark.timeout(400)
@pytest.mark.parametrize("override,accepted", [("max_steps=6", True), ("seed=3", False)])
def test_submit_into_a_job_folder_follows_the_resume_rule(demo_run, tmp_path, override, accepted):
    shutil.copytree(demo_run, tmp_path / "job" / "run")
    res = (launch_here if accepted else launch)("submit", *DEMO, "--cluster", GPU_PROFILE, "--dry-run", "--out",
                                                tmp_path / "job", override)
    if accepted:
        assert res.returncode == 0 and "dry run: nothing submitted" in res.stdout, res.stderr
    else:
        assert "holds a different run (train.seed: 0 there, 3 here" in one_line_error(res)


# --- item 7: a stalled or killed rank is named ---------------------------------------------
def ranks_of(launcher: subprocess.Popen) -> list[int]:
    """The launcher's rank processes, in rank order (started in that order)."""
    return sorted(p for p in children(launcher.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text())


@pytest.mark.timeout(400)
def test_a_frozen_rank_is_named_within_the_hang_timeout(tmp_path):
    proc = start_run(tmp_path / "run", "train.hang_timeout_s=20")
    rank1 = ranks_of(proc)[1]
    os.kill(rank1, signal.SIGSTOP)
    try:
        frozen_at = time.monotonic()
        _, err = proc.communicate(timeout=120)
        waited = time.monotonic() - frozen_at
    finally:
        with contextlib.suppress(ProcessLookupError):  # the watchdog ends it
            os.kill(rank1, signal.SIGKILL)
    assert proc.returncode == 1, err
    line = err.strip().splitlines()[-1]
    assert "no step completed for 20 s (train.hang_timeout_s)" in line, err
    assert f"rank 1 (pid {rank1}) is stopped" in line and "rank 0" not in line, err
    assert waited < 20 + 30, waited


@pytest.mark.timeout(400)
def test_a_killed_rank_is_blamed_not_its_survivor(tmp_path):
    proc = start_run(tmp_path / "run")
    os.kill(ranks_of(proc)[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert err.strip().splitlines()[-1] == ("launch run: rank 1 failed: killed by SIGKILL without reporting "
                                            "(killed or crashed)"), err


# A run killed right after a checkpoint kept every step logged up to it: TensorBoard's writer
# flushes every two minutes; the steps logged before a checkpoint must be on disk when it is
# published, since a run killed then resumes after them and never logs them again (found by
# bench/chaos.py). Checked by test_second_run_into_a_busy_folder_is_refused_naming_the_holder,
# whose launcher, SIGKILLed right after a checkpoint, takes its ranks with it at once (PR_SET_PDEATHSIG).
