"""Shared pieces of `launch submit`, `sweep` and `status|tail|cancel`: reaching the cluster,
turning a profile + command-line request into sbatch parameters (checked before anything is
submitted), job folders, and submission through submitit.

A job folder holds everything about one submission: recipe.yaml (resolved), job.json
(job id, cluster, points), sbatch.sh, submitit/ (pickles and per-task logs), and one run/
folder per training run (checkpoints, TensorBoard) with its interruptions.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import unicodedata
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from launch.clusters import ClusterProfile, LaunchError, format_minutes, parse_time
from launch.job import CANCEL_FILE
from launch.paths import PathProblem, check_folder
from launch.resolve import DEFAULT_TRAINER, RecipeError

REPO = Path(__file__).resolve().parents[1]
LOCAL_DIR = Path(os.environ.get("VSGD_SLURM_LOCAL") or REPO / ".slurm-local")
"""The local cluster's folder, the one setting shared with slurm/local/start.sh and stop.sh."""
LOCAL_ENV = LOCAL_DIR / "env"
JOB_FILE = "job.json"


# --- reaching the cluster ----------------------------------------------------------------
def use_cluster(profile: ClusterProfile) -> None:
    """Point this process's SLURM commands (and submitit's) at the profile's cluster."""
    if not profile.local:
        return
    if not LOCAL_ENV.is_file():
        raise LaunchError(f"the local cluster is not running (no {LOCAL_ENV}); start it with: "
                          "bash slurm/local/start.sh")
    for line in LOCAL_ENV.read_text().splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        if name == "SLURM_CONF":
            os.environ["SLURM_CONF"] = shlex.split(value)[0]


def slurm_cmd(*argv: str, check: bool = True) -> str:
    """Run a SLURM client command; a failure becomes a one-line LaunchError."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise LaunchError(f"{argv[0]} not found: run on a SLURM login node "
                          "(or start the local cluster: bash slurm/local/start.sh)") from None
    if check and out.returncode != 0:
        msg = (out.stderr or out.stdout).strip().splitlines()
        raise LaunchError(f"{' '.join(argv[:2])} failed: {msg[-1] if msg else out.returncode}")
    return out.stdout


def local_sinfo(*options: str) -> list[str]:
    """Words of `sinfo -h OPTIONS` on the local cluster."""
    try:
        return slurm_cmd("sinfo", "-h", *options).split()
    except LaunchError as e:
        raise LaunchError(f"{e}; is the local cluster running? bash slurm/local/start.sh") from None


def cluster_partitions(profile: ClusterProfile) -> list[str]:
    """Partitions a job may use: sinfo's on the local cluster, the profile's elsewhere."""
    if profile.local:
        return sorted({p.rstrip("*") for p in local_sinfo("-o", "%P")})
    return profile.allowed_partitions


def cluster_max_nodes(profile: ClusterProfile) -> int:
    """Largest --nodes: as many as the local cluster runs (start.sh --nodes N), the profile's
    max_nodes elsewhere."""
    if profile.local:
        return len(set(local_sinfo("-N", "-o", "%N")))
    return profile.max_nodes


# --- request -> sbatch parameters ---------------------------------------------------------
@dataclass(frozen=True)
class JobSpec:
    """A checked request for one job (or each task of an array), in sbatch terms."""

    job_name: str
    """Shown by squeue/sacct; the job folder's name."""
    partition: str | None
    """Partition to queue in (None: the cluster default)."""
    nodes: int
    """Number of nodes."""
    ntasks_per_node: int
    """Tasks (training processes) per node: one per GPU, or --tasks-per-node on CPU clusters."""
    gpus_per_node: int
    """GPUs per node; 0 leaves --gpus-per-node out of the script."""
    cpus_per_task: int
    """Cores per task."""
    time: int
    """Time limit in minutes (submitit's unit)."""
    signal_delay_s: int
    """USR2 arrives this many seconds before the time limit."""
    account: str | None
    """--account, if any."""
    qos: str | None
    """--qos, if any."""
    constraint: str | None
    """--constraint, if any."""
    mem: str | None
    """--mem per node, if any."""
    setup: list[str]
    """Shell lines before srun (profile setup, PYTHONPATH to this checkout, and on CPU
    clusters the allocator settings)."""

    def __post_init__(self):
        for f in fields(self):
            if isinstance(getattr(self, f.name), str):
                sbatch_value(f"--{f.name.replace('_', '-')}", getattr(self, f.name))

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    def sbatch_parameters(self, comment: str) -> dict:
        """Keyword arguments of submitit's SLURM executor (its sbatch names)."""
        params = {k: v for k, v in asdict(self).items() if v is not None}
        if not self.gpus_per_node:
            params.pop("gpus_per_node")
        params["comment"] = comment
        # One task that dies (killed, crashed, ended by its step watchdog) ends every task of
        # the step at once: the others would wait in a collective for the process-group
        # timeout, and a frozen (SIGSTOPped) task would hold the job until its time limit.
        params["srun_args"] = ["--kill-on-bad-exit=1"]
        return params


def sbatch_value(name: str, value: str) -> str:
    """`value`, or LaunchError if it holds a control character: sbatch reads one
    `#SBATCH --name=value` per line, so a newline in a value would start a shell line."""
    bad = sorted({c for c in value if unicodedata.category(c) == "Cc"})
    if bad:
        raise LaunchError(f"{name} {value!r} holds control character(s) {', '.join(map(repr, bad))}; "
                          "give one printable line")
    return value


def job_folder(out: str | None, default: Path) -> Path:
    """The job folder, absolute: --out, else `default`. Its path names the job's logs and
    is its sbatch comment, so it is checked like every sbatch value."""
    try:
        folder = check_folder(Path(out or default).resolve(), "--out")
    except PathProblem as e:
        raise LaunchError(str(e)) from None
    return Path(sbatch_value("--out", str(folder)))


def add_request_arguments(parser: argparse.ArgumentParser, cluster_required: bool = True) -> None:
    """Options shared by `submit` and `sweep` (whose --local needs no --cluster)."""
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    parser.add_argument("--cluster", required=cluster_required, help="profile in slurm/clusters/ (e.g. local)")
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="GPUs per node, one task each (default: all of the profile's)")
    parser.add_argument("--tasks-per-node", type=int, default=None,
                        help="tasks per node on CPU-only clusters (default 1)")
    parser.add_argument("--partition", help="partition (default: the profile's)")
    parser.add_argument("--time", help="time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS "
                                        "(default: the profile's)")
    parser.add_argument("--account", help="account to charge (default: the profile's)")
    parser.add_argument("--qos", help="quality of service (default: the profile's)")
    parser.add_argument("--out", help="job folder (default: runs/<recipe name>)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print a summary (ranks, batch per rank, time, folders, logs, data) and the "
                             "#SBATCH lines; submit nothing")
    parser.add_argument("--full", action="store_true",
                        help="with --dry-run: print the whole resolved recipe and sbatch script too")
    parser.add_argument("--no-data-check", action="store_true",
                        help="do not check the data folder before queueing (for login nodes that cannot "
                             "see the compute nodes' data)")
    parser.add_argument("--trainer", default=DEFAULT_TRAINER, help=argparse.SUPPRESS)


def build_spec(profile: ClusterProfile, args: argparse.Namespace, job_name: str) -> JobSpec:
    """Check the request against the profile (and the live local cluster for partitions and nodes)."""
    where = f"cluster profile {profile.name!r}"
    max_nodes = cluster_max_nodes(profile)
    if not 1 <= args.nodes <= max_nodes:
        fix = (f"; restart it with more: bash slurm/local/stop.sh && bash slurm/local/start.sh --nodes {args.nodes}"
               if profile.local and args.nodes > max_nodes else "")
        raise LaunchError(f"--nodes {args.nodes}: {where} allows 1 to {max_nodes}{fix}")
    if profile.gpus_per_node:
        gpus = profile.gpus_per_node if args.gpus_per_node is None else args.gpus_per_node
        if not 1 <= gpus <= profile.gpus_per_node:
            raise LaunchError(f"--gpus-per-node {gpus}: {where} has 1 to {profile.gpus_per_node} GPUs per node")
        if args.tasks_per_node not in (None, gpus):
            raise LaunchError(f"--tasks-per-node {args.tasks_per_node}: on GPU clusters there is one task "
                              f"per GPU; drop it or set --gpus-per-node {args.tasks_per_node}")
        tasks = gpus
    else:
        if args.gpus_per_node:
            raise LaunchError(f"--gpus-per-node {args.gpus_per_node}: {where} has no GPUs; "
                              "use --tasks-per-node for CPU ranks")
        gpus, tasks = 0, args.tasks_per_node or 1
    if not 1 <= tasks <= profile.max_tasks_per_node:
        raise LaunchError(f"{tasks} tasks per node: {where} allows 1 to {profile.max_tasks_per_node}")
    if tasks * profile.cpus_per_task > profile.cpus_per_node:
        raise LaunchError(f"{tasks} tasks x {profile.cpus_per_task} CPUs exceed the {profile.cpus_per_node} "
                          f"CPUs of a node in {where}; ask for fewer tasks per node")
    minutes = parse_time(args.time or profile.time_default)
    if minutes > parse_time(profile.time_max):
        raise LaunchError(f"--time {args.time}: longer than the {profile.time_max} allowed by {where}")
    partition = args.partition or profile.partition
    if partition is not None:
        known = cluster_partitions(profile)
        if partition not in known:
            raise LaunchError(f"unknown partition {partition!r} on {where}; choose from {', '.join(known)}")
    setup = [*profile.setup,
             f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}"]
    if profile.network_interface:  # a name checked by load_profile
        iface = profile.network_interface
        setup.append(f"export GLOO_SOCKET_IFNAME={iface} NCCL_SOCKET_IFNAME={iface}")
    if not gpus:  # CPU ranks: a caching allocator, the one the node has (vsgd_dist/allocator.py)
        allocator = shlex.quote(str(REPO / "vsgd_dist" / "allocator.py"))  # run as a file: no torch import
        setup.append(f'eval "$({shlex.quote(sys.executable)} {allocator})"')
    return JobSpec(job_name=job_name, partition=partition, nodes=args.nodes, ntasks_per_node=tasks,
                   gpus_per_node=gpus, cpus_per_task=profile.cpus_per_task, time=minutes,
                   signal_delay_s=profile.signal_delay_s, account=args.account or profile.account,
                   qos=args.qos or profile.qos, constraint=profile.constraint, mem=profile.mem, setup=setup)


def describe(spec: JobSpec, profile: ClusterProfile) -> str:
    """One line: where and how big, as printed after submission."""
    unit = f"{spec.gpus_per_node} GPUs" if spec.gpus_per_node else f"{spec.ntasks_per_node} tasks"
    return (f"cluster {profile.name}, partition {spec.partition or '(default)'}, {spec.nodes} node(s) x {unit}, "
            f"time {format_minutes(spec.time)}")


def check_factory(path: str) -> None:
    """Fail before submission if the trainer factory's module cannot be found."""
    module, sep, attr = path.partition(":")
    try:
        found = bool(sep and attr and importlib.util.find_spec(module))
    except ModuleNotFoundError:
        found = False
    if not found:
        raise LaunchError(f"trainer {path!r} not found; give an importable package.module:Factory")


# --- job folders --------------------------------------------------------------------------
def claim_run_dir(point_dir: Path, recipe: dict, trainer: str) -> None:
    """Refuse a folder whose run this recipe cannot continue: for the real trainer, its own
    rule on point_dir/run (what a checkpoint fixes); for another trainer, any other recipe."""
    if trainer == DEFAULT_TRAINER:
        from vsgd_dist.config import ConfigError, config_from_dict
        from vsgd_dist.train.checkpoint import check_run_dir

        try:
            check_run_dir(point_dir / "run", config_from_dict(recipe))
        except ConfigError as e:
            raise LaunchError(str(e)) from None
        return
    path = point_dir / "recipe.yaml"
    if path.exists() and yaml.safe_load(path.read_text()) != recipe:
        raise LaunchError(f"{point_dir} already holds a different recipe; pick another --out "
                          "(folders are never overwritten)")


def check_not_active(job_dir: Path) -> None:
    """Refuse to submit into a folder whose previous job is still queued or running."""
    info = read_job_file(job_dir)
    if info and slurm_cmd("squeue", "-h", "-j", str(info["job_id"]), "-o", "%i", check=False).strip():
        raise LaunchError(f"job {info['job_id']} of {job_dir} is still queued or running; "
                          f"wait, or cancel it: python -m launch cancel {job_dir}")


def write_point(point_dir: Path, recipe: dict) -> Path:
    """Create point_dir with its recipe.yaml; return its run folder."""
    point_dir.mkdir(parents=True, exist_ok=True)
    (point_dir / CANCEL_FILE).unlink(missing_ok=True)  # a cancel request of an earlier job
    (point_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return point_dir / "run"


def read_job_file(job_dir: Path) -> dict | None:
    path = job_dir / JOB_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# --- submission ---------------------------------------------------------------------------
def render_sbatch(spec: JobSpec, job_dir: Path, array_size: int | None = None) -> str:
    """The sbatch script submitit would write, without needing sbatch (for --dry-run)."""
    from vsgd_dist.compat.submitit import sbatch_script

    return sbatch_script(job_dir / "submitit", array_size, **spec.sbatch_parameters(comment=str(job_dir)))


def sbatch_directives(script: str) -> list[str]:
    """The script's #SBATCH lines: what sbatch is asked for."""
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def make_executor(spec: JobSpec, job_dir: Path, max_timeouts: int):
    """A submitit AutoExecutor writing pickles and logs under job_dir/submitit."""
    import submitit

    executor = submitit.AutoExecutor(folder=job_dir / "submitit", cluster="slurm",
                                     slurm_max_num_timeout=max_timeouts)
    executor.update_parameters(**{f"slurm_{k}": v for k, v in spec.sbatch_parameters(str(job_dir)).items()})
    return executor


def finish_submission(job_dir: Path, job, profile: ClusterProfile, points: list[str]) -> dict:
    """Record the job in job.json and copy its sbatch script next to it."""
    job_id = str(job.job_id).split("_")[0]
    info = {"job_id": job_id, "cluster": profile.name, "cluster_profile": profile.source, "array": bool(points),
            "points": points, "slurm_conf": os.environ.get("SLURM_CONF")}
    (job_dir / JOB_FILE).write_text(json.dumps(info, indent=1))
    (job_dir / "sbatch.sh").write_text(Path(job.paths.submission_file).read_text())
    return info


def print_errors(fn):
    """Wrap a command's main so that a request or recipe error is one line and exit code 2."""
    def main(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (LaunchError, RecipeError) as e:
            print(f"python -m launch {args.command}: error: {e}", file=sys.stderr)
            return 2
    main.__doc__ = fn.__doc__
    return main
