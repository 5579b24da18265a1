"""Cluster profiles: what one SLURM cluster offers and allows, read from slurm/clusters/*.yaml.

A profile keeps site facts (partition, account, GPUs per node, module loads) out of the
recipes, and lets `launch submit` refuse an impossible request before anything reaches
sbatch.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PROFILE_DIR = Path(__file__).resolve().parents[1] / "slurm" / "clusters"


class LaunchError(ValueError):
    """A problem found before submission, worded as one line naming the fix (exit code 2)."""


_IFNAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,15}$")
_TIME_FORMATS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
_TIME_RE = re.compile(r"^(?:(?P<days>[0-9]+)-(?P<dh>[0-9]+)(?::(?P<dm>[0-9]+)(?::(?P<ds>[0-9]+))?)?"
                      r"|(?P<a>[0-9]+)(?::(?P<b>[0-9]+)(?::(?P<c>[0-9]+))?)?)$")


def parse_time(text: str) -> int:
    """SLURM time string (any of sbatch's formats) -> whole minutes (rounded up, as submitit
    takes minutes)."""
    match = _TIME_RE.match(str(text).strip())
    if match is None:
        raise LaunchError(f"time {text!r} is not a SLURM time; use {_TIME_FORMATS} (e.g. 01:30:00)")
    if match["days"] is not None:
        days, hours, minutes, seconds = (int(match[k] or 0) for k in ("days", "dh", "dm", "ds"))
        limits = ((hours, 23), (minutes, 59), (seconds, 59))
    elif match["c"] is not None:  # HH:MM:SS
        days, hours, minutes, seconds = 0, int(match["a"]), int(match["b"]), int(match["c"])
        limits = ((minutes, 59), (seconds, 59))
    else:  # MM or MM:SS
        days, hours, minutes, seconds = 0, 0, int(match["a"]), int(match["b"] or 0)
        limits = ((seconds, 59),)
    if any(value > top for value, top in limits):
        raise LaunchError(f"time {text!r} has a field out of range (hours 0-23 after a day count, "
                          f"minutes and seconds 0-59); use {_TIME_FORMATS}")
    total = -(-(((days * 24 + hours) * 60 + minutes) * 60 + seconds) // 60)
    if total <= 0:
        raise LaunchError(f"time {text!r} is zero; ask for at least one minute")
    return total


def format_minutes(minutes: int) -> str:
    """Whole minutes -> D-HH:MM:SS (or HH:MM:SS under a day), as sinfo prints limits."""
    days, rest = divmod(minutes, 24 * 60)
    clock = f"{rest // 60:02d}:{rest % 60:02d}:00"
    return f"{days}-{clock}" if days else clock


@dataclass(frozen=True)
class ClusterProfile:
    """One SLURM cluster as seen by `launch submit`; loaded from slurm/clusters/<name>.yaml or
    any YAML file (`--cluster path/to/mine.yaml`)."""

    name: str
    """Profile name (the YAML file's stem); set by the loader, not written in the file."""
    description: str = ""
    """One line shown by `launch submit --help`-style listings."""
    local: bool = False
    """The cluster of slurm/local/start.sh: SLURM_CONF is read from its folder
    ($VSGD_SLURM_LOCAL, default .slurm-local), partitions and the node count (max_nodes) are
    asked from sinfo instead of this file."""
    partition: str | None = None
    """Partition used when --partition is not given (None: the cluster's default)."""
    partitions: list[str] = field(default_factory=list)
    """Partitions users may pick with --partition (empty: only `partition`)."""
    account: str | None = None
    """Default --account (charged allocation); --account overrides it."""
    qos: str | None = None
    """Default --qos; --qos overrides it."""
    constraint: str | None = None
    """sbatch --constraint, e.g. a GPU model feature such as "a100"."""
    gpus_per_node: int = 0
    """GPUs on one node; 0 marks a CPU-only cluster (tasks then set by --tasks-per-node, gloo)."""
    gpu_memory_gib: float = 0
    """One GPU's memory in GiB: the dry run's memory plan then says whether the recipe fits
    and, if not, what would (0: the plan is printed without that verdict)."""
    cpus_per_node: int = 1
    """CPU cores on one node; tasks_per_node * cpus_per_task may not exceed it."""
    cpus_per_task: int = 1
    """Cores given to each task (data-loading workers + the training process)."""
    mem: str | None = None
    """sbatch --mem per node (e.g. "480G", "0" for all of it); None leaves the site default."""
    max_nodes: int = 1
    """Largest --nodes this cluster (or your allocation) allows (a local cluster: its node count)."""
    max_tasks_per_node: int = 1
    """Largest tasks per node; on GPU clusters one task per GPU, so normally gpus_per_node."""
    signal_delay_s: int = 120
    """Seconds before the time limit at which SLURM sends USR2, so the job can checkpoint."""
    time_default: str = "01:00:00"
    """Time limit when --time is not given (any SLURM time: MM, MM:SS, HH:MM:SS, D-HH, ...)."""
    time_max: str = "1-00:00:00"
    """Largest --time the partition accepts."""
    max_preemptions: int = 10
    """Requeues after preemption before the job gives up (timeouts use max_timeouts)."""
    max_timeouts: int = 3
    """Requeues after hitting the time limit (submitit's max_num_timeout)."""
    network_interface: str | None = None
    """Interface the ranks talk over (e.g. "ib0"), exported to every task as GLOO_SOCKET_IFNAME
    and NCCL_SOCKET_IFNAME; None lets gloo and NCCL use the address of the node's hostname."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run in the sbatch script before srun (module loads, exports). They are
    shell code written by the cluster's admin or user and go into the script verbatim."""
    source: str = ""
    """The YAML file the profile was read from; set by the loader (job.json records it so
    that status/tail/cancel find the same cluster)."""

    @property
    def allowed_partitions(self) -> list[str]:
        return self.partitions or ([self.partition] if self.partition else [])


def known_profiles(directory: Path = PROFILE_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def _check_type(name: str, value: object, hint: object, where: str) -> None:
    """Raise LaunchError if `value` does not fit the dataclass annotation `hint`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        ok = isinstance(value, list) and all(isinstance(v, args[0]) for v in value)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, hint)  # type: ignore[arg-type]
    if not ok:
        expected = getattr(hint, "__name__", str(hint)).replace("typing.", "")
        if origin is list:
            expected = f"a list of {args[0].__name__}"
        raise LaunchError(f"{where}: {name} must be {expected}, got {value!r}")


REQUIRED = ("gpus_per_node", "cpus_per_node", "cpus_per_task")
"""Fields a profile must state: their defaults would silently mean a CPU cluster of 1-core nodes."""
REQUIRED_MEANING = {"gpus_per_node": "GPUs on one node, 0 for a CPU-only cluster",
                    "cpus_per_node": "CPU cores on one node", "cpus_per_task": "cores each task (rank) gets"}


def profile_path(name_or_path: str, directory: Path = PROFILE_DIR) -> Path:
    """The file a --cluster value names: a YAML path (anything with a '/' or a .yaml/.yml
    suffix, relative to here), else <directory>/<name>.yaml."""
    if "/" in name_or_path or name_or_path.endswith((".yaml", ".yml")):
        return Path(name_or_path).expanduser().resolve()
    return directory / f"{name_or_path}.yaml"


def load_profile(name: str, directory: Path = PROFILE_DIR) -> ClusterProfile:
    """Read and check a profile: a name in `directory` or a path to a YAML file anywhere;
    unknown, ill-typed or missing required keys are errors."""
    path = profile_path(name, directory)
    if not name or path.is_dir():
        known = ", ".join(known_profiles(directory))
        raise LaunchError(f"cluster profile {name!r} is not a file; give a name ({known}) or a path to a profile YAML")
    if not path.is_file():
        if path.parent != directory:
            raise LaunchError(f"cluster profile {str(path)!r} does not exist; give a path to a profile YAML (copy "
                              f"slurm/clusters/example-a100.yaml) or a name: {', '.join(known_profiles(directory))}")
        raise LaunchError(f"unknown cluster profile {name!r}; known: {', '.join(known_profiles(directory))} "
                          f"(or give a path to your own profile YAML, e.g. a copy of slurm/clusters/example-a100.yaml)")
    where = f"slurm/clusters/{path.name}" if path.parent == PROFILE_DIR else str(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LaunchError(f"{where} is not valid YAML: {e}".replace("\n", " ")) from None
    except OSError as e:
        raise LaunchError(f"{where} cannot be read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise LaunchError(f"{where} must be a mapping of profile fields")
    hints = typing.get_type_hints(ClusterProfile)
    fields = [f.name for f in dataclasses.fields(ClusterProfile) if f.name not in ("name", "source")]
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(fields)}"
            raise LaunchError(f"{where}: unknown key {key!r}; {hint}")
        _check_type(key, value, hints[key], where)
    profile = ClusterProfile(name=path.stem, **data)
    for key in ("time_default", "time_max"):
        try:
            parse_time(getattr(profile, key))
        except LaunchError as e:
            raise LaunchError(f"{where}: {key}: {e}") from None
    for key in ("cpus_per_node", "cpus_per_task", "max_nodes", "max_tasks_per_node"):
        if getattr(profile, key) < 1:
            raise LaunchError(f"{where}: {key} must be at least 1")
    if profile.network_interface is not None and not _IFNAME_RE.match(profile.network_interface):
        raise LaunchError(f"{where}: network_interface {profile.network_interface!r} is not an interface "
                          "name (1-15 of letters, digits, '.', '_', '-')")
    for key in REQUIRED:
        if key not in data:
            raise LaunchError(f"{where}: missing required field {key} ({REQUIRED_MEANING[key]}); add a line "
                              f"'{key}: N'")
    return dataclasses.replace(profile, source=str(path))
