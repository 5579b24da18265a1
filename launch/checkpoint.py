"""`python -m launch checkpoint inspect|convert RUN_OR_CKPT_DIR`: checkpoints, offline.

inspect: what the latest checkpoint holds (step, world size, engine, optimizer, model, per-rank
file and optimizer-state sizes), every file checked against its checksum. convert:
consolidate it in this one process (no torch.distributed) into one file that
`torch.load(FILE, weights_only=True)` reads as {"step", "model": {name: tensor},
"optimizer": {param name: {state key: tensor or number}}, "param_groups", "optimizer_class",
"master" (fp32 masters of bf16 weights, else empty), "source" (the checkpoint's meta.json)},
and, when the run used a gradient transform, "grad_state": {key: {param name: tensor}}
(alpha-SVRG's snapshot, full gradient and cached gradients, e.g. "svrg/full_grad").
"""
from __future__ import annotations

import sys
from pathlib import Path

from launch.paths import PathProblem, check_folder
from vsgd_dist.train.checkpoint import CheckpointError, latest_checkpoint, open_checkpoint, verify_file


def add_arguments(parser, name):
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    inspect = sub.add_parser("inspect", help="print what the latest checkpoint holds")
    inspect.add_argument("path", help="run folder, its checkpoints/ folder, or one step_* folder")
    convert = sub.add_parser("convert", help="consolidate the latest checkpoint into one .pt file")
    convert.add_argument("path", help="run folder, its checkpoints/ folder, or one step_* folder")
    convert.add_argument("--out", required=True, help="file to write (e.g. consolidated.pt)")


def main(args) -> int:
    try:
        path = find_checkpoint(Path(args.path))
        if args.action == "convert" and Path(args.out).is_dir():
            raise CheckpointError(f"--out {args.out} is a folder; give a file to write, e.g. "
                                  f"{Path(args.out) / 'consolidated.pt'}")
        if args.action == "convert":
            check_folder(Path(args.out).parent, "--out's folder")
        meta, read = open_checkpoint(path)
        if args.action == "inspect":
            print(describe(path, meta))
        else:
            write_consolidated(meta, read, Path(args.out))
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
    state_bytes = meta["state_bytes_per_rank"]
    for rank in range(meta["world_size"]):
        size = verify_file(path, meta, rank).stat().st_size
        lines.append(f"{rank:>4}  {size / 2**20:>8.2f}  {state_bytes[rank] / 2**20:>19.2f}")
    return "\n".join(lines)


def write_consolidated(meta: dict, read, out: Path) -> None:
    import torch

    from vsgd_dist.train.engine_state import full_state, grad_state_full

    full = full_state(lambda rank: read(rank)["engine"], meta)
    if meta.get("grad_state"):
        full["grad_state"] = grad_state_full(lambda rank: read(rank)["engine"], meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        torch.save({**full, "source": meta}, tmp)
        tmp.rename(out)  # never a half-written file under the requested name
    finally:
        tmp.unlink(missing_ok=True)
