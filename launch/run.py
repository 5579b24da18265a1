"""`python -m launch run RECIPE [key=value ...] [--nproc N]`: train on N local processes.

The recipe and the run folder are checked before any process starts, and the run folder is
locked for the whole run (vsgd_dist/train/run_lock.py). SIGTERM, SIGINT and
SIGHUP stop every rank at one step with a checkpoint (launch/signals.py). Under srun (the
plain sbatch template) pass --from-env: the process then joins the group that RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT describe instead of starting ranks itself.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

from launch.paths import PathProblem, check_folder
from launch.resolve import RecipeError, check_data_workers
from launch.signals import STOP_SIGNALS, ForwardSignals, Interrupted, die_with_parent, stop_on_signals
from launch.watchdog import Watchdog, heartbeats, publish
from vsgd_dist.config import ConfigError, load_recipe


def add_arguments(parser, name):
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/demo.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides: optimizer=vsgd engine=zero seed=1 max_steps=100 out=runs/x ...")
    parser.add_argument("--nproc", type=int, default=1, help="local processes (ranks), default 1")
    parser.add_argument("--from-env", action="store_true",
                        help="join the process group described by RANK/WORLD_SIZE/MASTER_* (srun)")
    parser.add_argument("--plan", action="store_true", help="print the memory each GPU needs at --nproc ranks and exit")
    parser.add_argument("--gpu-memory-gib", type=float, help="with --plan: a GPU's memory, to say whether it fits")


def main(args) -> int:
    if args.plan:
        from launch.plan import print_plan

        return print_plan(args)
    if args.from_env:
        return run(args, None)
    with ForwardSignals() as signals:
        try:
            return run(args, signals)
        except Interrupted as e:
            print(f"launch run: {e} received {'again' if signals.received else 'before the ranks started'}: "
                  f"stopped without saving", file=sys.stderr)
            return 128 + e.signum


def run(args, signals: ForwardSignals | None) -> int:
    world = int(os.environ.get("WORLD_SIZE", 1)) if args.from_env else args.nproc
    if world < 1:
        print(f"launch run: --nproc must be at least 1, got {world}", file=sys.stderr)
        return 2
    from vsgd_dist.data import DataError, inspect_beton, resolve_dataset
    from vsgd_dist.distributed import NodeLayoutError, ranks_per_node
    from vsgd_dist.train.checkpoint import check_run_dir, latest_checkpoint

    try:
        cfg = load_recipe(args.recipe, args.overrides, world_size=world)
        if args.from_env and cfg.engine.shard_within == "node":
            ranks_per_node(world)  # srun's layout, before joining the group
        check_data_workers(cfg.to_dict(), local_cores(), "a rank gets here")
        check_folder(cfg.train.out, "out=")
        check_run_dir(Path(cfg.train.out), cfg)
        files = resolve_dataset(cfg.data)  # writes the demo data once, before the ranks start
        for split in (files.train, files.val):
            inspect_beton(split)
    except (ConfigError, DataError, NodeLayoutError, RecipeError, PathProblem) as e:
        print(f"launch run: {e}", file=sys.stderr)
        return 2
    from vsgd_dist.spawn import RankFailed, run_distributed
    from vsgd_dist.train.run_lock import RunLock, RunLocked

    # the run folder is locked by this launcher, or under srun by rank 0, for the whole run
    holds_lock = not args.from_env or os.environ.get("RANK") == "0"
    watchdog = None if args.from_env else Watchdog(heartbeats(world), world, cfg.train.hang_timeout_s)
    if watchdog is not None:
        _quiet_resource_tracker()
    try:
        with RunLock(cfg.train.out) if holds_lock else contextlib.nullcontext():
            if watchdog is None:  # under srun: SLURM's USR2 before the time limit stops with a checkpoint too
                summary = _train(cfg, signals=(*STOP_SIGNALS, signal.SIGUSR2))
            else:
                with watchdog:
                    summary = run_distributed(_train_rank, world, cfg.to_dict(), os.getpid(), watchdog.slots,
                                              timeout=None)[0]
    except RunLocked as e:
        print(f"launch run: {e}", file=sys.stderr)
        return 2
    except RankFailed as e:
        if watchdog and watchdog.verdict:
            print(f"launch run: {watchdog.verdict}; {_kept(cfg)}", file=sys.stderr)
            return 1
        if signals and signals.received:
            print(f"launch run: {signal.Signals(signals.received).name} received before training started: "
                  f"nothing saved", file=sys.stderr)
            return 128 + signals.received
        print(f"launch run: rank {e.rank} failed: {e.summary}", file=sys.stderr)
        return 1
    if signals and signals.received and summary["status"] == "stopped":
        saved = latest_checkpoint(Path(cfg.train.out) / "checkpoints")
        print(f"launch run: {signal.Signals(signals.received).name} received: every rank stopped at step "
              f"{summary['step']} and saved it to {saved}; run the same command to resume", file=sys.stderr)
        return 128 + signals.received
    print(f"launch run: {summary['status']} at step {summary['step']}"
          + (f", val top-1 {summary['val_top1']:.4f}" if "val_top1" in summary else "")
          + f"; TensorBoard: tensorboard --logdir {Path(cfg.train.out) / 'tb'}")
    return 0


def local_cores() -> int:
    """Threads one process may run here: numba's own limit (its env setting, else the CPU affinity)."""
    return int(os.environ.get("NUMBA_NUM_THREADS", len(os.sched_getaffinity(0))))


def _quiet_resource_tracker() -> None:
    """Ranks ended by SIGKILL (the watchdog, a second signal, a crash) leave semaphores that
    multiprocessing's resource tracker removes with a warning printed after our one-line
    report; the removal stays, the warning goes (the tracker reads PYTHONWARNINGS)."""
    quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, (os.environ.get("PYTHONWARNINGS"), quiet)))


def _kept(cfg) -> str:
    from vsgd_dist.train.checkpoint import latest_checkpoint

    latest = latest_checkpoint(Path(cfg.train.out) / "checkpoints")
    return f"{latest} is kept: run the same command to resume from it" if latest else "no checkpoint was saved"


def _train(cfg, heartbeat_slots=None, rank: int = 0, signals: tuple = STOP_SIGNALS) -> dict:
    """Train in this process; a stop signal ends the run at the agreed step, with a checkpoint.
    With `heartbeat_slots`, the launcher's watchdog sees every step this rank completes."""
    from vsgd_dist.train.trainer import Trainer

    trainer = Trainer(cfg)
    stop_on_signals(trainer.request_stop, signals)
    if heartbeat_slots is not None:
        publish(heartbeat_slots, rank, lambda: getattr(trainer, "step", None))
    return trainer.run()


def _train_rank(rank: int, world_size: int, cfg_dict: dict, launcher_pid: int, heartbeat_slots) -> dict:
    die_with_parent(launcher_pid)
    return _train(cfg_dict, heartbeat_slots, rank)
