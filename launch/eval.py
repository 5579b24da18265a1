"""`python -m launch eval RUN_OR_CHECKPOINT [--split val|minival] [--ema]`: evaluate a saved
checkpoint without training: top-1, top-5, NLL and ECE on a split, printed and written as
eval_<split>[_ema].json into the checkpoint's folder.

One process on this machine (the first GPU, else the CPU). The model, data and evaluation
settings (resolution, crop, test-time flip, precision) are the run's own, from the
recipe.yaml saved in its run folder; any engine's checkpoint at any world size loads.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from launch.checkpoint import find_checkpoint


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("path", metavar="RUN_OR_CHECKPOINT",
                        help="run folder (its latest checkpoint), its checkpoints/ folder, or one step_* folder")
    parser.add_argument("--split", choices=("val", "minival"), default="val",
                        help="val (default) or minival (the train images data.minival held out)")
    parser.add_argument("--ema", action="store_true", help="evaluate the weight EMA (train.ema_decay) instead")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="images per batch (default: the run's images per rank per step)")


def main(args: argparse.Namespace) -> int:
    from vsgd_dist.config import ConfigError
    from vsgd_dist.data import DataError
    from vsgd_dist.train.checkpoint import CheckpointError

    try:
        metrics, out = evaluate(args)
    except (CheckpointError, ConfigError, DataError, FileNotFoundError, EvalError) as e:
        print(f"python -m launch eval: error: {e}", file=sys.stderr)
        return 2
    print(f"{metrics['split']}{' (EMA)' if args.ema else ''} at step {metrics['step']}, {metrics['images']} images: "
          f"top-1 {100 * metrics['top1']:.2f}%  top-5 {100 * metrics['top5']:.2f}%  NLL {metrics['nll']:.4f}  "
          f"ECE {100 * metrics['ece']:.2f}%")
    print(f"written to {out}")
    return 0


class EvalError(ValueError):
    """A request this checkpoint cannot answer; the message says why."""


def evaluate(args: argparse.Namespace) -> tuple[dict, Path]:
    import torch
    import yaml

    from vsgd_dist.config import config_from_dict
    from vsgd_dist.data import build_val_loader, resolve_dataset
    from vsgd_dist.models import build_model
    from vsgd_dist.train.checkpoint import RECIPE_FILE, read_full
    from vsgd_dist.train.predictions import SUMS_SIZE, metrics_from_sums, prediction_sums

    checkpoint = find_checkpoint(Path(args.path))
    recipe_file = checkpoint.parent.parent / RECIPE_FILE
    if not recipe_file.is_file():
        raise EvalError(f"{recipe_file} is missing: the checkpoint must sit in its run folder's checkpoints/")
    cfg = config_from_dict(yaml.safe_load(recipe_file.read_text()))
    if args.split == "minival" and not cfg.data.minival:
        raise EvalError("this run held out no minival images (data.minival: 0); use --split val")
    full = read_full(checkpoint)
    meta = full["meta"]
    classes = resolve_dataset(cfg.data).manifest.classes
    model = build_model(cfg.model.name, len(classes), image_size=cfg.data.end_res, blurpool=cfg.model.blurpool,
                        drop_path=cfg.model.drop_path, seed=cfg.train.seed)
    model.load_state_dict(full["model"])
    if args.ema:
        load_ema(model, full["trainer"][0].get("ema"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    from launch.run import local_cores

    data = dataclasses.replace(cfg.data, num_workers=max(1, min(cfg.data.num_workers, local_cores())))
    batch = args.batch_size or max(1, cfg.train.global_batch // meta["world_size"])
    loader = build_val_loader(data, device, batch_size=batch, minival=args.split == "minival")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    sums = torch.zeros(SUMS_SIZE, dtype=torch.float64, device=device)
    with torch.no_grad():
        for images, labels in loader:
            with autocast:
                logits = model(images).float()
                if cfg.train.val_flip:
                    logits = (logits + model(images.flip(3)).float()) / 2
            sums += prediction_sums(logits.log_softmax(1), labels)
    metrics = {"split": args.split, "ema": args.ema, "step": meta["step"], "checkpoint": str(checkpoint),
               "images": int(sums[0].item()), **metrics_from_sums(sums)}
    out = checkpoint / f"eval_{args.split}{'_ema' if args.ema else ''}.json"
    out.write_text(json.dumps(metrics, indent=1))
    return metrics, out


def load_ema(model, averages) -> None:
    """Put the saved weight EMA (one fp32 tensor per parameter) into the model's parameters."""
    import torch

    if not averages:
        raise EvalError("this run kept no weight EMA (train.ema_decay: 0); drop --ema")
    params = list(model.parameters())
    if [tuple(a.shape) for a in averages] != [tuple(p.shape) for p in params]:
        raise EvalError("the EMA was saved sharded (FSDP2 keeps each rank's part): evaluate the weights "
                        "without --ema")
    with torch.no_grad():
        for p, average in zip(params, averages):
            p.copy_(average)
