"""Checkpoints: one folder per step, one file per rank, published atomically.

    checkpoints/step_00000120/meta.json      step, world size, engine, optimizer, model,
                                             the SHA-256 of every rank file
    checkpoints/step_00000120/rank0.pt ...   what that rank holds (`engine_state.payload`)

Every rank writes its own file into `step_X.tmp`; after a barrier rank 0 writes meta.json
and renames the folder. A crash or kill mid-write leaves only a `.tmp` folder, which is
never picked up as the latest and is removed by the next save. Files are plain tensors and
containers, read back with `torch.load(weights_only=True)`, so a tampered file cannot run
code. Any engine loads a checkpoint of any engine at any world size (see
`vsgd_dist.train.engine_state` and `vsgd_dist.full_form`); the model and optimizer must be
the same. A checkpoint whose
weights or optimizer state hold NaN or inf is never published. Every read checks the file
against its checksum, so a file damaged on disk or in a copy is named instead of loaded, and
a full disk while saving is one line naming the step, the folder and the step kept.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from vsgd_dist.config import ConfigError, RunConfig, save_config
from vsgd_dist.distributed import gather_host_objects, reduce_host_values
from vsgd_dist.engines.ownership import state_bytes
from vsgd_dist.optim import OPTIMIZERS
from vsgd_dist.registry import class_path
from vsgd_dist.train import engine_state
from vsgd_dist.train.run_lock import is_lock_file

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


class Checkpointer:
    def __init__(self, folder: Path, keep: int):
        self.folder = Path(folder)
        self.keep = keep

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
        transforms' state), written through the engine so that it reshards like optimizer state."""
        rank, world = dist.get_rank(), dist.get_world_size()
        payload = {"engine": engine_state.payload(engine), "trainer": {"step": step, **trainer_state}}
        if grad_state:
            payload["engine"]["grad_state"] = engine_state.grad_state_payload(engine, grad_state)
        if reduce_host_values([not _all_finite(payload["engine"])], op="max")[0]:
            raise FloatingPointError(f"weights or optimizer state are not finite at step {step}: not saved; "
                                     f"{self.describe_latest()} (lower optim.lr or set train.grad_clip)")
        final = self.folder / f"step_{step:08d}"
        tmp = final.with_suffix(".tmp")
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        file = tmp / f"rank{rank}.pt"
        with self._writing(step, file), open(file, "wb") as f:  # a Python file: a full disk raises OSError
            torch.save(payload, f)
        # also: every file is complete
        held, digests = zip(*gather_host_objects((state_bytes(engine.ownership()), file_digest(file))))
        if rank == 0:
            optimizer_class = class_path(OPTIMIZERS.get(cfg.optim.name).optimizer_class)
            meta = {"step": step, "world_size": world, "engine": cfg.engine.name, "zero_stage": cfg.engine.zero_stage,
                    "optimizer": cfg.optim.name, "optimizer_class": optimizer_class,
                    "model": cfg.model.name, "state_bytes_per_rank": [int(b) for b in held],
                    "sha256": {f"rank{r}.pt": digest for r, digest in enumerate(digests)}}
            if grad_state:
                meta["grad_state"] = sorted(grad_state)
            with self._writing(step, tmp / "meta.json"):
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            if final.exists():  # the same step saved again (e.g. stop at the last step)
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
        dist.barrier()
        return final

    @contextlib.contextmanager
    def _writing(self, step: int, file: Path):
        """Turn a failed write of `file` (disk full, file size limit, quota) into one line
        naming the step, the folder and the checkpoint kept (torch's own error only says
        "enforce fail"); the partial file is deleted to give the space back."""
        try:
            yield
        except (OSError, RuntimeError) as e:
            cause = e if isinstance(e, OSError) else e.__context__
            if not isinstance(cause, OSError):
                raise
            file.unlink(missing_ok=True)
            latest = self.latest()
            kept = f"step {_step_of(latest)} kept" if latest else "no checkpoint to resume from"
            raise CheckpointError(f"{(cause.strerror or str(cause)).lower()} writing step {step} to {file.parent}; "
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
        meta, read = open_checkpoint(path)
        for key, mine in (("optimizer", cfg.optim.name), ("model", cfg.model.name)):
            if meta[key] != mine:
                raise CheckpointError(f"{path} holds a {key} {meta[key]!r} checkpoint, this run uses {mine!r}; "
                                      f"use another out= folder")
        engine_state.load(engine, lambda rank: read(rank)["engine"], meta,
                          OPTIMIZERS.get(cfg.optim.name).optimizer_class)
        trainer = read(min(dist.get_rank(), meta["world_size"] - 1))["trainer"]
        if meta.get("grad_state"):
            trainer["grad_state"] = engine_state.load_grad_state(engine, lambda rank: read(rank)["engine"], meta)
        return trainer


def _all_finite(tree) -> bool:
    """Whether every floating-point tensor in a nested dict/list is free of NaN and inf."""
    if isinstance(tree, dict):
        return all(_all_finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(_all_finite(v) for v in tree)
    if torch.is_tensor(tree) and tree.is_floating_point():
        return bool(torch.isfinite(tree).all())
    return True


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest published `step_*` folder (a `.tmp` one is a write that never finished)."""
    done = sorted(p for p in Path(folder).glob("step_*") if p.suffix != ".tmp" and (p / "meta.json").is_file())
    return done[-1] if done else None


def open_checkpoint(path: Path) -> tuple[dict, Callable[[int], dict]]:
    """(meta.json, read) for a published checkpoint folder; `read(rank)` checks that rank's
    file against its checksum, then loads it memory-mapped with weights_only=True, which
    refuses anything but tensors and containers."""
    path = Path(path)
    meta = read_meta(path)
    missing = [f"rank{r}.pt" for r in range(meta["world_size"]) if not (path / f"rank{r}.pt").is_file()]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)} of its {meta['world_size']} rank files; "
                              f"it was copied incompletely: copy it again or delete it to resume from an older one")

    def read(rank: int) -> dict:
        file = verify_file(path, meta, rank)
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{file} holds objects other than tensors and containers "
                                  f"({str(e).splitlines()[-1].strip()}); it was not written by this trainer or "
                                  f"was tampered with: delete that checkpoint folder") from None
        except Exception as e:  # noqa: BLE001 - whatever the unpickler trips on, the file is damaged
            raise CheckpointError(f"{file} is not a readable checkpoint file ({type(e).__name__}: "
                                  f"{(str(e).splitlines() or [''])[0]}); delete that checkpoint folder") from None

    return meta, read


def read_meta(path: Path) -> dict:
    """A checkpoint folder's meta.json, or CheckpointError naming it."""
    file = Path(path) / "meta.json"
    try:
        meta = json.loads(file.read_text())
        int(meta["world_size"]), int(meta["step"])
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{file} is unreadable ({type(e).__name__}: {e}); the checkpoint is damaged: "
                              f"delete {path} to resume from an older one") from None
    return meta


def verify_file(path: Path, meta: dict, rank: int) -> Path:
    """rank`rank`.pt of the checkpoint at `path`, after checking it against the checksum in
    meta.json (checkpoints written before checksums are taken as they are)."""
    file = Path(path) / f"rank{rank}.pt"
    expected = meta.get("sha256", {}).get(file.name)
    if expected is not None and file_digest(file) != expected:
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
