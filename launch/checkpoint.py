"""`python -m launch checkpoint inspect|convert|upgrade RUN_OR_CKPT_DIR`: checkpoints, offline.

inspect: what the latest checkpoint holds (step, world size, engine, optimizer, model, per-rank
file and optimizer-state sizes), every file checked against its checksum. convert:
consolidate it in this one process (no torch.distributed) into one file that
`torch.load(FILE, weights_only=True)` reads as {"step", "model": {name: tensor} (a plain
state_dict: `model.load_state_dict(converted["model"])`, fp32 weights), "optimizer": {param
name: {state key: tensor or number}}, "param_groups", "optimizer_class", "source" (the
checkpoint's meta.json)}, and, when the run used a gradient transform, "grad_state": {key:
{param name: tensor}} (alpha-SVRG's snapshot, full gradient and cached gradients, e.g.
"svrg/full_grad"). upgrade: rewrite every checkpoint of the old per-rank format (rank<r>.pt
files) under the folder in the current DCP format, in place.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from launch.paths import PathProblem, check_folder
from vsgd_dist.train.checkpoint import (FORMAT, CheckpointError, file_digest, latest_checkpoint, read_full, read_meta,
                                        verify_file)


def add_arguments(parser, name):
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    inspect = sub.add_parser("inspect", help="print what the latest checkpoint holds")
    inspect.add_argument("path", help="run folder, its checkpoints/ folder, or one step_* folder")
    convert = sub.add_parser("convert", help="consolidate the latest checkpoint into one .pt file")
    convert.add_argument("path", help="run folder, its checkpoints/ folder, or one step_* folder")
    convert.add_argument("--out", required=True, help="file to write (e.g. consolidated.pt)")
    upgrade = sub.add_parser("upgrade", help="rewrite old per-rank checkpoints in the current format, in place")
    upgrade.add_argument("path", help="run folder, its checkpoints/ folder, or one step_* folder")


def main(args) -> int:
    try:
        if args.action == "upgrade":
            for folder in upgrade_all(Path(args.path)):
                print(f"upgraded {folder}")
            return 0
        path = find_checkpoint(Path(args.path))
        if args.action == "convert" and Path(args.out).is_dir():
            raise CheckpointError(f"--out {args.out} is a folder; give a file to write, e.g. "
                                  f"{Path(args.out) / 'consolidated.pt'}")
        if args.action == "convert":
            check_folder(Path(args.out).parent, "--out's folder")
        meta = read_meta(path)
        if args.action == "inspect":
            print(describe(path, meta))
        else:
            write_consolidated(path, Path(args.out))
            print(f"wrote {args.out} (step {meta['step']}, {meta['world_size']} {meta['engine']} ranks consolidated)")
        return 0
    except (CheckpointError, FileNotFoundError, PathProblem) as e:
        print(f"python -m launch checkpoint {args.action}: {e}", file=sys.stderr)
        return 2


def find_checkpoint(path: Path) -> Path:
    """The checkpoint folder `path` names: itself (holds meta.json) or the latest under it."""
    if (path / "meta.json").is_file():
        return path
    if path.is_file():
        if (path.parent / "meta.json").is_file():
            raise CheckpointError(f"{path} is one rank's file; give its checkpoint folder {path.parent}")
        raise CheckpointError(f"{path} is a file; give a run folder or a checkpoint folder")
    for folder in (path / "checkpoints", path):
        found = latest_checkpoint(folder)
        if found is not None:
            return found
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist; give a run folder or a checkpoint folder")
    half = sorted(p.name for p in [*path.glob("step_*"), *path.glob("checkpoints/step_*")])
    if half:
        raise CheckpointError(f"{path} holds only unfinished checkpoints ({', '.join(half[:3])}: a write that was "
                              f"interrupted); resume the run to write a complete one")
    raise CheckpointError(f"{path} holds no checkpoints; give a run folder (with checkpoints/) or a step_* folder")


def describe(path: Path, meta: dict) -> str:
    engine = meta["engine"] + (f" (stage {meta['zero_stage']})" if meta["engine"] in ("zero", "deepspeed") else "")
    lines = [f"checkpoint  {path}", f"step        {meta['step']}", f"world size  {meta['world_size']}",
             f"engine      {engine}", f"optimizer   {meta['optimizer']} ({meta['optimizer_class']})",
             f"model       {meta['model']}", "", "rank  file MiB  optimizer state MiB"]
    sizes = {name: verify_file(path, meta, name).stat().st_size for name in sorted(meta["sha256"])}
    for rank, state_bytes in enumerate(meta["state_bytes_per_rank"]):
        size = sum(s for name, s in sizes.items() if name.startswith(f"__{rank}_"))
        lines.append(f"{rank:>4}  {size / 2**20:>8.2f}  {state_bytes / 2**20:>19.2f}")
    return "\n".join(lines)


def write_consolidated(path: Path, out: Path) -> None:
    import torch

    full = read_full(path)
    meta = full["meta"]
    consolidated = {"step": meta["step"], "model": full["model"], "optimizer": full["optimizer"],
                    "param_groups": full["param_groups"], "optimizer_class": meta["optimizer_class"], "source": meta}
    if full["grad_state"]:
        consolidated["grad_state"] = full["grad_state"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        torch.save(consolidated, tmp)
        tmp.rename(out)  # never a half-written file under the requested name
    finally:
        tmp.unlink(missing_ok=True)


def upgrade_all(path: Path) -> list[Path]:
    """Rewrite each old-format checkpoint folder under `path` (or `path` itself) in the DCP
    format: written beside it as `.tmp`, then swapped in."""
    folders = [path] if (path / "meta.json").is_file() else sorted(
        p for p in [*path.glob("step_*"), *path.glob("checkpoints/step_*")] if (p / "meta.json").is_file())
    old = [f for f in folders if json.loads((f / "meta.json").read_text()).get("format") != FORMAT]
    if not old:
        raise CheckpointError(f"{path} holds no checkpoint of the old per-rank format; nothing to upgrade")
    for folder in old:
        upgrade(folder)
    return old


def upgrade(folder: Path) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from launch.legacy_checkpoint import open_legacy, upgraded_state
    from vsgd_dist.compat.torch import CheckpointableSavePlanner

    meta, read = open_legacy(folder)
    state, fields = upgraded_state(meta, read)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process, as meant
        dcp.save(state, storage_writer=FileSystemWriter(tmp), planner=CheckpointableSavePlanner(), no_dist=True)
    keep = ("step", "world_size", "engine", "zero_stage", "optimizer", "optimizer_class", "model",
            "state_bytes_per_rank")
    new_meta = {"format": FORMAT, **{k: meta[k] for k in keep}, **fields,
                "sha256": {p.name: file_digest(p) for p in sorted(tmp.iterdir())}}
    (tmp / "meta.json").write_text(json.dumps(new_meta, indent=1))
    retired = folder.with_name(folder.name + ".old.tmp")  # never taken for a checkpoint
    folder.rename(retired)
    tmp.rename(folder)
    shutil.rmtree(retired)
