"""`python -m launch run RECIPE [key=value ...] [--nproc N]`: train on N local processes.

The recipe and the run folder are checked before any process starts. Under srun (the plain
sbatch template) pass --from-env: the process then joins the group that RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT describe instead of starting ranks itself.
"""
from __future__ import annotations

import sys
from pathlib import Path

from vsgd_dist.config import ConfigError, load_recipe


def add_arguments(parser, name):
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/demo.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides: optimizer=vsgd engine=zero seed=1 max_steps=100 out=runs/x ...")
    parser.add_argument("--nproc", type=int, default=1, help="local processes (ranks), default 1")
    parser.add_argument("--from-env", action="store_true",
                        help="join the process group described by RANK/WORLD_SIZE/MASTER_* (srun)")


def main(args) -> int:
    import os

    world = int(os.environ.get("WORLD_SIZE", 1)) if args.from_env else args.nproc
    if world < 1:
        print(f"launch run: --nproc must be at least 1, got {world}", file=sys.stderr)
        return 2
    from vsgd_dist.data import DataError, inspect_beton, resolve_dataset
    from vsgd_dist.train.checkpoint import check_run_dir

    try:
        cfg = load_recipe(args.recipe, args.overrides, world_size=world)
        check_run_dir(Path(cfg.train.out), cfg)
        files = resolve_dataset(cfg.data)  # writes the demo data once, before the ranks start
        for split in (files.train, files.val):
            inspect_beton(split)
    except (ConfigError, DataError) as e:
        print(f"launch run: {e}", file=sys.stderr)
        return 2
    from vsgd_dist.spawn import RankFailed, run_distributed

    try:
        if args.from_env:
            from vsgd_dist.train.trainer import Trainer

            summary = Trainer(cfg).run()
        else:
            summary = run_distributed(_train_rank, world, cfg.to_dict(), timeout=None)[0]
    except RankFailed as e:
        print(f"launch run: rank {e.rank} failed: {e.summary}", file=sys.stderr)
        return 1
    print(f"launch run: {summary['status']} at step {summary['step']}"
          + (f", val top-1 {summary['val_top1']:.4f}" if "val_top1" in summary else "")
          + f"; TensorBoard: tensorboard --logdir {Path(cfg.train.out) / 'tb'}")
    return 0


def _train_rank(rank: int, world_size: int, cfg_dict: dict) -> dict:
    from vsgd_dist.train.trainer import Trainer

    return Trainer(cfg_dict).run()
