"""Checkpoints: one folder per step in torch.distributed.checkpoint (DCP) format, published atomically.

    checkpoints/step_00000120/.metadata         DCP's index of every tensor chunk and value
    checkpoints/step_00000120/__0_0.distcp ...  what each rank wrote (`vsgd_dist.train.dcp_state`)
    checkpoints/step_00000120/meta.json         step, world size, engine, optimizer, model,
                                                parameter shapes, the SHA-256 of every file

Every rank writes its chunks into `step_X.tmp` with `dcp.save` (or `dcp.async_save`, the
training going on meanwhile); then rank 0 writes meta.json and renames the folder. A crash or
kill mid-write leaves only a `.tmp` folder, never picked up as the latest and removed by the
next save. Any engine at any world size loads a checkpoint of any engine: each rank asks DCP
for the chunks of the elements it holds. Every file is checked against its checksum before it
is read, `.metadata` is unpickled admitting only DCP's metadata classes, and values load with
`torch.load(weights_only=True)`, so a damaged or tampered file is named instead of loaded or
run. A checkpoint whose weights or optimizer state hold NaN or inf is never published, and a
full disk while saving is one line naming the step, the folder and the step kept.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from vsgd_dist.compat.torch import (CheckpointableSavePlanner, OSErrorWriter, SafeLoadPlanner, SafeReader,
                                    UnreadableFile)
from vsgd_dist.config import ConfigError, RunConfig, save_config
from vsgd_dist.distributed import gather_host_objects, reduce_host_values
from vsgd_dist.engines.ownership import state_bytes
from vsgd_dist.optim import OPTIMIZERS
from vsgd_dist.registry import class_path
from vsgd_dist.train import dcp_state
from vsgd_dist.train.dcp_state import CheckpointMismatch
from vsgd_dist.train.run_lock import is_lock_file

FORMAT = "vsgd_dist.dcp/1"
RECIPE_FILE = "recipe.yaml"
# What a run resuming from a checkpoint must keep, and why; everything else (engine, world
# size, max_steps, cadences, data workers, hyperparameters) may change between the runs that
# share a folder.
FIXED_ON_RESUME = {
    "model.name": "the checkpoint holds this model's weights",
    "optim.name": "the checkpoint holds this optimizer's state",
    "train.global_batch": "the checkpoint's data position counts batches of this size",
    "train.seed": "the data order and crops follow this seed",
    "data.data_dir": "the checkpoint's data position is in this dataset",
    "data.minival": "the checkpoint's data position counts the training images left after the held-out ones",
    "data.minival_seed": "the held-out images (and so the training images) follow this seed",
    "data.repeated_aug": "the checkpoint's data position is in the order this many copies per image give",
}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into this run; the message says what differs."""


class _Staged:
    """DCP's async stager protocol for a state dict already copied by `_stage`."""

    should_synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


class Checkpointer:
    def __init__(self, folder: Path, keep: int, background: bool = False):
        """`background`: save with `dcp.async_save` (train.async_checkpoint); `wait()` publishes."""
        self.folder = Path(folder)
        self.keep = keep
        self.background = background
        self._in_flight = None  # (step, tmp folder, meta, future) of a background save
        self._group = None  # the gloo group background saves talk over, apart from training's

    def latest(self) -> Path | None:
        return latest_checkpoint(self.folder)

    def describe_latest(self) -> str:
        """Where a failed run can resume from, for error messages."""
        latest = self.latest()
        if latest is None:
            return "no checkpoint was written"
        return f"the latest checkpoint, {latest} (finite weights), is kept: rerun the same command to resume from it"

    def save(self, engine, cfg: RunConfig, *, step: int, grad_state: dict | None = None, **trainer_state) -> Path:
        """`grad_state`: {key: tensors laid out like `engine.reduced_grads()`} (gradient
        transforms' state), saved like optimizer state. In the background (`background`), the
        save in flight is waited for first, and this one is published by the next `wait()`."""
        self.wait()
        rank, world = dist.get_rank(), dist.get_world_size()
        state = dcp_state.save_state(engine, grad_state, {"step": step, **trainer_state})
        if reduce_host_values([not _all_finite(dcp_state.local_tensors(state))], op="max")[0]:
            raise FloatingPointError(f"weights or optimizer state are not finite at step {step}: not saved; "
                                     f"{self.describe_latest()} (lower optim.lr or set train.grad_clip)")
        own = engine.ownership()
        held = gather_host_objects(state_bytes(own))
        meta = {"format": FORMAT, "step": step, "world_size": world, "engine": cfg.engine.name,
                "zero_stage": cfg.engine.zero_stage, "optimizer": cfg.optim.name,
                "optimizer_class": class_path(OPTIMIZERS.get(cfg.optim.name).optimizer_class),
                "model": cfg.model.name, "state_bytes_per_rank": [int(b) for b in held],
                "params": dcp_state.params_of(own), "grad_state": sorted(grad_state or ())}
        tmp = (self.folder / f"step_{step:08d}").with_suffix(".tmp")
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        if self.background:
            if self._group is None:
                self._group = dist.new_group(backend="gloo")
            future = dcp.async_save(_stage(state), storage_writer=self._storage_writer(tmp),
                                    planner=CheckpointableSavePlanner(), process_group=self._group,
                                    async_stager=_Staged())
            self._in_flight = (step, tmp, meta, future)
            return tmp.with_suffix("")
        with self._writing(step, tmp):
            dcp.save(state, storage_writer=self._storage_writer(tmp), planner=CheckpointableSavePlanner())
        return self._publish(step, tmp, meta)

    def _storage_writer(self, tmp: Path) -> OSErrorWriter:
        """DCP's writer into `tmp` (a method, so that a test can make a background write fail)."""
        return OSErrorWriter(tmp)

    def wait(self) -> None:
        """Wait for the background save in flight and publish it; a failed one is reported
        on stderr and the previous checkpoint stays the resume point."""
        if self._in_flight is None:
            return
        step, tmp, meta, future = self._in_flight
        self._in_flight = None
        error = None
        try:
            with self._writing(step, tmp):
                future.result()
        except (CheckpointException, Exception) as e:  # noqa: BLE001 - reported, training goes on
            error = e
        if reduce_host_values([error is not None], op="max")[0]:
            if error is not None:
                print(f"checkpoint: background save of step {step} failed ({_one_line(error)}); "
                      f"{self.describe_latest()}", file=sys.stderr, flush=True)
            return
        self._publish(step, tmp, meta)

    def _publish(self, step: int, tmp: Path, meta: dict) -> Path:
        """Rank 0 writes meta.json with every file's SHA-256 (each rank hashes its own) and
        renames the folder."""
        rank = dist.get_rank()
        mine = {p.name: file_digest(p) for p in sorted(tmp.glob(f"__{rank}_*"))}
        digests = gather_host_objects(mine)
        final = tmp.with_suffix("")
        if rank == 0:
            meta["sha256"] = {name: d for per_rank in digests for name, d in per_rank.items()}
            meta["sha256"][".metadata"] = file_digest(tmp / ".metadata")
            with self._writing(step, tmp):
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            if final.exists():  # the same step saved again (e.g. stop at the last step)
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
        dist.barrier()
        return final

    @contextlib.contextmanager
    def _writing(self, step: int, tmp: Path):
        """Turn a failed write into `tmp` (disk full, file size limit, quota) into one line
        naming the step, the folder and the checkpoint kept; the partial folder is deleted to
        give the space back."""
        try:
            yield
        except (OSError, RuntimeError, CheckpointException) as e:
            cause = _os_error(e)
            if cause is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            latest = self.latest()
            kept = f"step {_step_of(latest)} kept" if latest else "no checkpoint to resume from"
            raise CheckpointError(f"{(cause.strerror or str(cause)).lower()} writing step {step} to {tmp}; "
                                  f"{kept}") from None

    def _prune(self) -> None:
        for stale in self.folder.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        done = sorted(p for p in self.folder.glob("step_*") if p.suffix != ".tmp")
        for old in done[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load_latest(self, engine, cfg: RunConfig) -> dict | None:
        """Load the latest checkpoint into `engine` (any engine, any world size); return the
        trainer state, or None. A rank beyond the writers' count gets the last writer's
        trainer state (its RNG state among it). Gradient-transform state saved with it comes
        back as "grad_state", in this engine's layout."""
        path = self.latest()
        if path is None:
            return None
        meta = read_meta(path)
        for key, mine in (("optimizer", cfg.optim.name), ("model", cfg.model.name)):
            if meta[key] != mine:
                raise CheckpointError(f"{path} holds a {key} {meta[key]!r} checkpoint, this run uses {mine!r}; "
                                      f"use another out= folder")
        loaded = load(engine, path, meta, OPTIMIZERS.get(cfg.optim.name).optimizer_class)
        trainer = loaded["trainer"]
        if loaded["grad_state"]:
            trainer["grad_state"] = loaded["grad_state"]
        return trainer


def load(engine, path: Path, meta: dict, optimizer_class: type) -> dict:
    """Load the checkpoint at `path` into `engine`: {"trainer": this rank's trainer state,
    "grad_state": gradient-transform state laid out like the engine's stores}."""
    if meta["optimizer_class"] != class_path(optimizer_class):
        raise CheckpointMismatch(f"checkpoint holds {meta['optimizer_class']} state, this run's optimizer is "
                                 f"{class_path(optimizer_class)}; resume with the optimizer it was written with "
                                 f"or use another out= folder")
    reader = safe_reader(path, meta)
    with named_failures(path):
        metadata = reader.read_metadata()
    dcp_state.check_model(engine, meta["params"], metadata)
    rank = dist.get_rank() if dist.is_initialized() else 0
    trainer_key = f"trainer/rank{min(rank, meta['world_size'] - 1)}"

    def read(state):
        with named_failures(path):
            dcp.load(state, storage_reader=safe_reader(path, meta), planner=SafeLoadPlanner())

    return dcp_state.load_state(engine, metadata, meta["params"], trainer_key, read)


def read_full(path: Path) -> dict:
    """The checkpoint at `path`, whole, per parameter (`dcp_state.full_form`), read in this one
    process (no process group), every file checked first; "step" and "meta" (meta.json) added."""
    meta = read_meta(path)
    reader = safe_reader(path, meta)
    with named_failures(path):
        metadata = reader.read_metadata()
    values = {fqn: torch.empty(md.size, dtype=md.properties.dtype) if isinstance(md, TensorStorageMetadata) else None
              for fqn, md in metadata.state_dict_metadata.items()}
    with named_failures(path), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process, as meant
        dcp.load(values, storage_reader=safe_reader(path, meta), planner=SafeLoadPlanner(), no_dist=True)
    return {**dcp_state.full_form(values, meta["params"]), "step": meta["step"], "meta": meta}


def _stage(state: dict) -> dict:
    """A copy of a `save_state` dict in host memory, for a background save while training
    changes the originals."""
    def copy(t):
        return t.detach().to("cpu", copy=True)

    out = {}
    for key, value in state.items():
        if isinstance(value, dcp_state.OwnedChunks):
            out[key] = dcp_state.OwnedChunks(value.numel, [(s, copy(t)) for s, t in value.chunks.items()])
        elif torch.is_tensor(value):
            out[key] = copy(value)
        else:
            out[key] = _copy_tree(value, copy)
    return out


def _copy_tree(tree, copy):
    if isinstance(tree, dict):
        return {k: _copy_tree(v, copy) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_copy_tree(v, copy) for v in tree)
    return copy(tree) if torch.is_tensor(tree) else tree


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind a failed write (DCP gathers each rank's failure), or None."""
    seen = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        if isinstance(e, CheckpointException):
            todo.extend(exc for exc, _ in e.failures.values())
        todo.extend([e.__cause__, e.__context__])
    return None


def _one_line(error: BaseException) -> str:
    cause = _os_error(error)
    if cause is not None:
        return cause.strerror or str(cause)
    if isinstance(error, CheckpointException):
        error = next(exc for exc, _ in error.failures.values())
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


@contextlib.contextmanager
def named_failures(path: Path):
    """Turn what DCP raises reading a damaged or foreign checkpoint into one CheckpointError
    naming the file."""
    try:
        yield
    except (CheckpointException, UnreadableFile, pickle.UnpicklingError, OSError, EOFError) as e:
        failures = [exc for exc, _ in e.failures.values()] if isinstance(e, CheckpointException) else [e]
        for failure in failures:
            if isinstance(failure, (CheckpointError, CheckpointMismatch)):
                raise failure from None
        failure = failures[0]
        file = failure.file if isinstance(failure, UnreadableFile) else path / ".metadata"
        cause = failure.cause if isinstance(failure, UnreadableFile) else failure
        foreign = [line.strip() for line in str(cause).splitlines()
                   if "Unsupported global" in line or "not part of a checkpoint's metadata" in line]
        if isinstance(cause, pickle.UnpicklingError) and foreign:  # else: a damaged pickle
            raise CheckpointError(f"{file} holds objects other than tensors and containers ({foreign[0]}); it "
                                  f"was not written by this trainer or was tampered with: delete that checkpoint "
                                  f"folder") from None
        lines = [line.strip() for line in str(cause).splitlines()
                 if line.strip() and not line.startswith("Check the documentation")] or [""]
        detail = lines[-1] if isinstance(cause, pickle.UnpicklingError) else lines[0]  # torch's advice comes first
        raise CheckpointError(f"{file} is not a readable checkpoint file ({type(cause).__name__}: {detail}); "
                              f"delete that checkpoint folder") from None


def safe_reader(path: Path, meta: dict) -> SafeReader:
    """A DCP reader of the checkpoint at `path` that checks each file against meta.json's
    checksum before reading it."""
    return SafeReader(path, lambda name: verify_file(path, meta, name))


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every floating-point tensor is free of NaN and inf."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest published `step_*` folder (a `.tmp` one is a write that never finished)."""
    done = sorted(p for p in Path(folder).glob("step_*") if p.suffix != ".tmp" and (p / "meta.json").is_file())
    return done[-1] if done else None


def read_meta(path: Path) -> dict:
    """A checkpoint folder's meta.json, or CheckpointError naming it; a checkpoint of the old
    per-rank format is refused saying how to convert it."""
    file = Path(path) / "meta.json"
    try:
        meta = json.loads(file.read_text())
        int(meta["world_size"]), int(meta["step"])
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{file} is unreadable ({type(e).__name__}: {e}); the checkpoint is damaged: "
                              f"delete {path} to resume from an older one") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is in the old per-rank format; convert it with "
                              f"`python -m launch checkpoint upgrade {path}`, then resume")
    missing = sorted(set(meta.get("sha256", {})) - {p.name for p in Path(path).iterdir()})
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing[:3])} of its {len(meta['sha256'])} files; it was "
                              f"copied incompletely: copy it again or delete it to resume from an older one")
    return meta


def verify_file(path: Path, meta: dict, name: str) -> Path:
    """File `name` of the checkpoint at `path`, after checking it against the checksum in
    meta.json."""
    file = Path(path) / name
    expected = meta.get("sha256", {}).get(name)
    if expected is None or file_digest(file) != expected:
        raise CheckpointError(f"{file} does not match the checksum meta.json recorded at save (it changed on "
                              f"disk or in a copy); delete {path} to resume from an older checkpoint")
    return file


def file_digest(file: Path) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step_"))


def open_run_dir(run_dir: Path, cfg: RunConfig, rank: int) -> None:
    """Use `run_dir` for this run: new, without a checkpoint (then it starts over, its old
    TensorBoard events cleared), or holding a checkpoint this recipe can continue. A folder
    holding another run is never touched; recipe.yaml records the recipe last run."""
    if rank == 0:
        check_run_dir(run_dir, cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        if latest_checkpoint(run_dir / "checkpoints") is None:
            shutil.rmtree(run_dir / "tb", ignore_errors=True)
        tmp = run_dir / (RECIPE_FILE + ".tmp")
        save_config(cfg, tmp)
        tmp.replace(run_dir / RECIPE_FILE)  # other ranks never see a half-written recipe
    dist.barrier()
    if rank != 0:
        check_run_dir(run_dir, cfg)


def check_run_dir(run_dir: Path, cfg: RunConfig) -> None:
    """Raise ConfigError when `run_dir` holds a run this recipe cannot continue: another
    program's files, or a checkpoint that differs in a FIXED_ON_RESUME key. A folder whose run
    never saved a checkpoint takes any recipe."""
    run_dir = Path(run_dir)
    recipe = run_dir / RECIPE_FILE
    if not recipe.exists():
        if run_dir.exists() and any(not is_lock_file(p.name) for p in run_dir.iterdir()):
            raise ConfigError(f"run folder {run_dir} is not empty and holds no {RECIPE_FILE}; "
                              f"pick another out= folder")
        return
    if latest_checkpoint(run_dir / "checkpoints") is None:
        return
    import yaml

    saved, mine = yaml.safe_load(recipe.read_text()), cfg.to_dict()
    for key, why in FIXED_ON_RESUME.items():
        if _get(saved, key) != _get(mine, key):
            raise ConfigError(f"run folder {run_dir} holds a different run ({key}: {_get(saved, key)!r} there, "
                              f"{_get(mine, key)!r} here; {why}); resume it with {key}={_get(saved, key)} "
                              f"or pick another out= folder")


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d
