"""`python -m launch run RECIPE --plan --nproc N [--gpu-memory-gib G]`: the memory each GPU
needs for the recipe at N ranks (vsgd_dist/memory_plan.py), printed before anything runs.
Exit status 1 when it does not fit the given (or visible) GPU memory."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from vsgd_dist.config import ConfigError, load_recipe

IMAGENET_CLASSES = 1000
DEMO_CLASSES = 10


def print_plan(args) -> int:
    from vsgd_dist.memory_plan import plan_lines

    try:
        cfg = load_recipe(args.recipe, args.overrides, world_size=args.nproc)
    except ConfigError as e:
        print(f"launch run: {e}", file=sys.stderr)
        return 2
    lines = plan_lines(cfg, args.nproc, gpu_memory(args), num_classes(cfg.data.data_dir))
    print("\n".join(lines))
    return 1 if lines[-1].startswith("does not fit") else 0


def num_classes(data_dir: str) -> int:
    """From the written data's manifest; before the data is written, ImageNet-1k's."""
    if not data_dir:
        return DEMO_CLASSES
    manifest = Path(data_dir) / "manifest.json"
    return len(json.loads(manifest.read_text())["classes"]) if manifest.is_file() else IMAGENET_CLASSES


def gpu_memory(args) -> int | None:
    if args.gpu_memory_gib:
        return int(args.gpu_memory_gib * 2**30)
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
