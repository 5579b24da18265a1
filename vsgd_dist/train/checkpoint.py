"""Checkpoints: one folder per step, one file per rank, published atomically.

    checkpoints/step_00000120/meta.json      step, world size, engine, optimizer, model
    checkpoints/step_00000120/rank0.pt ...   what that rank holds (engine.checkpoint_state)

Every rank writes its own file into `step_X.tmp`; after a barrier rank 0 writes meta.json
and renames the folder. A crash or kill mid-write leaves only a `.tmp` folder, which is
never picked up as the latest and is removed by the next save. Files are plain tensors and
containers, read back with `torch.load(weights_only=True)`, so a tampered file cannot run
code. Any engine loads a checkpoint of any engine at any world size (see
`vsgd_dist.full_form`); the model and optimizer must be the same. A checkpoint whose
weights or optimizer state hold NaN or inf is never published.
"""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from vsgd_dist.config import ConfigError, RunConfig, config_from_dict, save_config
from vsgd_dist.distributed import gather_host_values, reduce_host_values
from vsgd_dist.sharding.zero import class_path

RECIPE_FILE = "recipe.yaml"
# Keys that may differ between the runs that share a folder (a resumed run).
RESUMABLE_DIFFERENCES = {"train.out", "train.stop_at", "train.progress"}


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

    def save(self, engine, cfg: RunConfig, *, step: int, **trainer_state) -> Path:
        rank, world = dist.get_rank(), dist.get_world_size()
        payload = {"engine": engine.checkpoint_state(), "trainer": {"step": step, **trainer_state}}
        if reduce_host_values([not _all_finite(payload["engine"])], op="max")[0]:
            raise FloatingPointError(f"weights or optimizer state are not finite at step {step}: not saved; "
                                     f"{self.describe_latest()} (lower optim.lr or set train.grad_clip)")
        final = self.folder / f"step_{step:08d}"
        tmp = final.with_suffix(".tmp")
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        torch.save(payload, tmp / f"rank{rank}.pt")
        state_bytes = gather_host_values(engine.state_bytes())  # also: every file is complete
        if rank == 0:
            meta = {"step": step, "world_size": world, "engine": cfg.engine.name, "zero_stage": cfg.engine.zero_stage,
                    "optimizer": cfg.optim.name, "optimizer_class": class_path(engine.optimizer_class),
                    "model": cfg.model.name, "state_bytes_per_rank": [int(b) for b in state_bytes]}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            if final.exists():  # the same step saved again (e.g. stop at the last step)
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        for stale in self.folder.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        done = sorted(p for p in self.folder.glob("step_*") if p.suffix != ".tmp")
        for old in done[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load_latest(self, engine, cfg: RunConfig) -> dict | None:
        """Load the latest checkpoint into `engine` (any engine, any world size); return the
        trainer state, or None. A rank beyond the writers' count gets the last writer's
        trainer state (its RNG state among it)."""
        path = self.latest()
        if path is None:
            return None
        meta, read = open_checkpoint(path)
        for key, mine in (("optimizer", cfg.optim.name), ("model", cfg.model.name)):
            if meta[key] != mine:
                raise CheckpointError(f"{path} holds a {key} {meta[key]!r} checkpoint, this run uses {mine!r}; "
                                      f"use another out= folder")
        engine.load_checkpoint_state(lambda rank: read(rank)["engine"], meta)
        return read(min(dist.get_rank(), meta["world_size"] - 1))["trainer"]


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
    """(meta.json, read) for a published checkpoint folder; `read(rank)` loads that rank's
    file memory-mapped with weights_only=True and refuses anything but tensors and containers."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    missing = [f"rank{r}.pt" for r in range(meta["world_size"]) if not (path / f"rank{r}.pt").is_file()]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)} of its {meta['world_size']} rank files; "
                              f"it was copied incompletely: copy it again or delete it to resume from an older one")

    def read(rank: int) -> dict:
        file = path / f"rank{rank}.pt"
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{file} holds objects other than tensors and containers "
                                  f"({str(e).splitlines()[-1].strip()}); it was not written by this trainer or "
                                  f"was tampered with: delete that checkpoint folder") from None
        except RuntimeError as e:
            raise CheckpointError(f"{file} is not a readable checkpoint file ({str(e).splitlines()[0]}); "
                                  f"delete that checkpoint folder") from None

    return meta, read


def open_run_dir(run_dir: Path, cfg: RunConfig, rank: int) -> None:
    """Use `run_dir` for this run: new, or holding the same recipe (then the run resumes).
    A folder holding a different run is never touched."""
    if rank == 0:
        check_run_dir(run_dir, cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / RECIPE_FILE).exists():
            tmp = run_dir / (RECIPE_FILE + ".tmp")
            save_config(cfg, tmp)
            tmp.rename(run_dir / RECIPE_FILE)  # other ranks never see a half-written recipe
    dist.barrier()
    if rank != 0:
        check_run_dir(run_dir, cfg)


def check_run_dir(run_dir: Path, cfg: RunConfig) -> None:
    """Raise ConfigError when `run_dir` holds another run (compared key by key)."""
    recipe = Path(run_dir) / RECIPE_FILE
    if not recipe.exists():
        if Path(run_dir).exists() and any(Path(run_dir).iterdir()):
            raise ConfigError(f"run folder {run_dir} is not empty and holds no {RECIPE_FILE}; "
                              f"pick another out= folder")
        return
    import yaml

    saved = config_from_dict(yaml.safe_load(recipe.read_text())).to_dict()
    differences = [k for k in _diff(saved, cfg.to_dict()) if k not in RESUMABLE_DIFFERENCES]
    if differences:
        key = differences[0]
        raise ConfigError(f"run folder {run_dir} holds a different run ({key}: {_get(saved, key)!r} there, "
                          f"{_get(cfg.to_dict(), key)!r} here{' and more' if len(differences) > 1 else ''}); "
                          f"resume it with the same recipe or pick another out= folder")


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(prefix + k)
    return keys


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d
