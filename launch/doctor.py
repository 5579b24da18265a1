"""`python -m launch doctor [--cluster NAME]`: is this machine ready to train? One screen,
one line per check, each ok or PROBLEM with its fix; exit status 1 when any is a problem.

Run it where the job will run (a compute node: `srun ... python -m launch doctor`): versions
(Python, torch, CUDA, cuDNN, NCCL), the GPUs and their memory, a collective across the
visible GPUs (NCCL) or 2 CPU processes (gloo), an FFCV write and decode of a generated JPEG,
DeepSpeed and whether its ops can be built here, and with --cluster the SLURM commands and
the profile's partition."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable

SETUP_CUDA = "bash scripts/setup.sh --torch cuda"


@dataclass
class Check:
    """One line of the report."""

    name: str
    """What was checked (a short word)."""
    detail: str
    """What was found."""
    fix: str = ""
    """Empty when fine; else what to do about it (marks the line a problem)."""


def add_arguments(parser, name):
    parser.add_argument("--cluster", help="cluster profile (slurm/clusters/NAME.yaml) whose SLURM setup to check")


def main(args) -> int:
    profile = None
    if args.cluster:
        from launch.clusters import LaunchError, load_profile

        try:
            profile = load_profile(args.cluster)
        except LaunchError as e:
            print(f"launch doctor: {e}", file=sys.stderr)
            return 2
    checks: dict[str, Callable[[], list[Check]]] = {
        "python": check_python, "torch": check_torch, "gpus": lambda: check_gpus(profile),
        "collective": check_collective, "ffcv": check_ffcv, "deepspeed": check_deepspeed}
    if profile is not None:
        checks["slurm"] = lambda: check_slurm(profile)
    problems = 0
    for name, check in checks.items():
        try:
            found = check()
        except Exception as e:  # noqa: BLE001 - a check that breaks is a problem to report, not a crash
            found = [Check(name, f"the check failed: {type(e).__name__}: {e}".splitlines()[0],
                           "fix the install (bash scripts/setup.sh) and run doctor again")]
        for c in found:
            problems += bool(c.fix)
            status = "PROBLEM" if c.fix else "ok"
            print(f"{status:8s}{c.name:12s}{c.detail}" + (f"\n{'':20s}fix: {c.fix}" if c.fix else ""), flush=True)
    print(f"launch doctor: {problems} problem(s)" if problems else "launch doctor: all checks passed")
    return 1 if problems else 0


def check_python() -> list[Check]:
    version = platform.python_version()
    fix = "" if sys.version_info >= (3, 10) else "use Python 3.10 or newer for the venv (python3 -m venv .venv)"
    return [Check("python", f"{version} at {sys.executable}", fix)]


def check_torch() -> list[Check]:
    import torch

    cuda = torch.version.cuda
    parts = [f"torch {torch.__version__}", f"CUDA build {cuda}" if cuda else "CPU build"]
    if cuda and torch.cuda.is_available():
        parts += [f"cuDNN {torch.backends.cudnn.version()}", f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}"]
    return [Check("torch", ", ".join(parts))]


def nvidia_gpus() -> list[str]:
    """GPUs the driver lists (nvidia-smi -L), whatever torch can use."""
    if not shutil.which("nvidia-smi"):
        return []
    res = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    return [ln for ln in res.stdout.splitlines() if ln.startswith("GPU ")] if res.returncode == 0 else []


def check_gpus(profile) -> list[Check]:
    import torch

    if torch.cuda.is_available():
        gpus = [f"{torch.cuda.get_device_name(i)} {torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB"
                for i in range(torch.cuda.device_count())]
        fix = ""
        if profile is not None and 0 < len(gpus) < profile.gpus_per_node and "CUDA_VISIBLE_DEVICES" not in os.environ:
            fix = (f"profile {profile.name!r} has {profile.gpus_per_node} GPUs per node: run doctor in an "
                   f"allocation with all of them (srun --gpus-per-node={profile.gpus_per_node} ...)")
        return [Check("gpus", f"{len(gpus)} visible: " + "; ".join(gpus), fix)]
    listed = nvidia_gpus()
    if listed:
        return [Check("gpus", f"the driver lists {len(listed)} but torch {torch.__version__} cannot use them",
                      f"install the CUDA build ({SETUP_CUDA}), or check the driver against CUDA {torch.version.cuda}"
                      if torch.version.cuda else f"torch is the CPU build: {SETUP_CUDA}")]
    if profile is not None and profile.gpus_per_node > 0:
        return [Check("gpus", "none visible", f"profile {profile.name!r} is a GPU cluster: run doctor on a compute "
                      f"node (srun --gpus-per-node={profile.gpus_per_node} python -m launch doctor "
                      f"--cluster {profile.name})")]
    return [Check("gpus", "none visible: runs use CPU processes over gloo")]


def _all_reduce(rank: int, world_size: int) -> tuple[str, float]:
    import torch

    from vsgd_dist.distributed import all_reduce, pick_device

    device = pick_device()
    values = all_reduce(torch.full((1 << 20,), float(rank + 1), device=device))
    expected = world_size * (world_size + 1) / 2
    return str(device), float((values - expected).abs().max())


def check_collective() -> list[Check]:
    import torch

    from vsgd_dist.spawn import RankFailed, run_distributed

    world = max(2, torch.cuda.device_count()) if torch.cuda.is_available() else 2
    backend = "NCCL" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available() and torch.cuda.device_count() == 1:
        backend, world = "NCCL (one GPU: 2 ranks share it)", 2
    try:
        results = run_distributed(_all_reduce, world, timeout=120)
    except (RankFailed, TimeoutError) as e:
        summary = e.summary if isinstance(e, RankFailed) else str(e)
        return [Check("collective", f"all_reduce over {world} ranks ({backend}) failed: {summary}",
                      "check NCCL_SOCKET_IFNAME/GLOO_SOCKET_IFNAME (the profile's network_interface) and that "
                      "127.0.0.1 is reachable; NCCL_DEBUG=INFO says more")]
    error = max(err for _, err in results)
    fix = "" if error == 0 else "the sum came back wrong: check the GPUs' peer-to-peer setup (NCCL_P2P_DISABLE=1)"
    return [Check("collective", f"all_reduce of 4 MiB over {world} ranks ({backend}, "
                  f"{', '.join(d for d, _ in results)}): {'exact' if error == 0 else f'off by {error}'}", fix)]


FFCV_ROUNDTRIP = textwrap.dedent("""
    import sys, tempfile, numpy as np
    from importlib.metadata import version
    from pathlib import Path
    from PIL import Image
    import ffcv
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.writer import DatasetWriter
    y, x = np.mgrid[0:48, 0:64]
    image = np.stack([x * 4, y * 5, (x + y) * 2], -1).astype(np.uint8)
    class Data:
        def __len__(self): return 2
        def __getitem__(self, i): return Image.fromarray(image), i
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "check.beton")
        DatasetWriter(path, {"image": RGBImageField(write_mode="jpg", jpeg_quality=95), "label": IntField()},
                      num_workers=1).from_indexed_dataset(Data())
        loader = Loader(path, batch_size=2, num_workers=1, order=OrderOption.SEQUENTIAL,
                        pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
        (images, labels), = list(loader)
    error = np.abs(np.asarray(images[0], dtype=np.int16) - image).mean()
    print(f"ffcv {version('ffcv')}, JPEG 64x48 written and decoded, mean error {error:.2f} of 255")
    sys.exit(0 if images.shape == (2, 48, 64, 3) and error < 4 else 3)
""")


def check_ffcv() -> list[Check]:
    # a subprocess with a timeout: FFCV hangs instead of raising when something inside it fails
    env = {**os.environ, "NUMBA_THREADING_LAYER": "omp"}
    try:
        res = subprocess.run([sys.executable, "-c", FFCV_ROUNDTRIP], capture_output=True, text=True, timeout=300,
                             env=env)
    except subprocess.TimeoutExpired:
        return [Check("ffcv", "the write and decode of one JPEG hung for 300 s",
                      "reinstall ffcv (bash scripts/setup.sh, or --wheelhouse DIR on a machine without its headers)")]
    if res.returncode == 0:
        return [Check("ffcv", res.stdout.strip().splitlines()[-1])]
    last = (res.stderr.strip() or res.stdout.strip() or f"exit status {res.returncode}").splitlines()[-1]
    return [Check("ffcv", f"write and decode of a JPEG failed: {last}",
                  "install ffcv with its image libraries: bash scripts/setup.sh, or bash scripts/setup.sh "
                  "--wheelhouse DIR with a wheelhouse from bash scripts/wheelhouse.sh")]


def check_deepspeed() -> list[Check]:
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except Exception as e:  # noqa: BLE001 - any import failure is the finding
        return [Check("deepspeed", f"does not import: {type(e).__name__}: {e}".splitlines()[0],
                      "only engine=deepspeed needs it: DS_BUILD_OPS=0 pip install -c constraints.txt deepspeed==0.19.8")]
    accelerator = get_accelerator()
    ops = []
    for op in ("FusedAdamBuilder", "CPUAdamBuilder"):
        builder_class = accelerator.get_op_builder(op)
        if builder_class is not None:
            ops.append(f"{builder_class().name} {'buildable' if builder_class().is_compatible(False) else 'not buildable'}")
    return [Check("deepspeed", f"{deepspeed.__version__}, accelerator {accelerator.device_name()}; ops (built on "
                  f"first use; engine=deepspeed needs none of them): {', '.join(ops) or 'none offered'}")]


def check_slurm(profile) -> list[Check]:
    from launch.clusters import LaunchError
    from launch.slurm import use_cluster

    missing = [c for c in ("sbatch", "squeue", "sinfo") if not shutil.which(c)]
    if missing:
        return [Check("slurm", f"{', '.join(missing)} not found on PATH",
                      "run doctor on a login or compute node of the cluster, after its module loads")]
    try:
        use_cluster(profile)
    except LaunchError as e:
        return [Check("slurm", str(e), "start it, or name another profile")]
    res = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        return [Check("slurm", f"sinfo failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}",
                      "check that slurmctld is reachable from here (scontrol ping)")]
    known = sorted(set(res.stdout.split()))
    wanted = [p for p in dict.fromkeys([profile.partition, *profile.partitions]) if p]
    unknown = [p for p in wanted if p not in known]
    fix = (f"set partition/partitions in slurm/clusters/{profile.name}.yaml to partitions SLURM knows "
           f"({', '.join(known) or 'none'})") if unknown else ""
    detail = (f"sbatch, squeue found; partition(s) {', '.join(wanted) or '(cluster default)'} "
              + (f"unknown to SLURM: {', '.join(unknown)}" if unknown else "known to SLURM"))
    return [Check("slurm", detail, fix)]
