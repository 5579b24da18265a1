"""`python -m launch sweep RECIPE --cluster PROFILE ... optimizer=vsgd,adamw seed=0,1,2`.

Every comma-separated override multiplies the grid; the cartesian product is submitted as
ONE SLURM job array (one array task per point), each point with its own folder named from
its values, e.g. `optimizer=vsgd,seed=0/` holding recipe.yaml and run/.

`--local --nproc N [--parallel K]` runs the same grid on this machine instead, in the same
folders: each point is a `launch run` process, K at a time. Rerunning skips finished points
(checkpoint at max_steps, final validation logged) and resumes interrupted ones from their
checkpoint. A stop signal reaches every running point, which saves; no new point starts.
"""
from __future__ import annotations

import argparse
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from launch.clusters import LaunchError, load_profile
from launch.job import TrainJob
from launch.preflight import check_data, data_problems, place_paths
from launch.resolve import DEFAULT_TRAINER, check_data_workers, parse_override, resolve_recipe
from launch.run import local_cores
from launch.signals import STOP_SIGNALS, die_with_parent
from launch.slurm import (add_request_arguments, build_spec, check_factory, check_not_active, claim_run_dir,
                          describe, finish_submission, job_folder, make_executor, print_errors, render_sbatch,
                          sbatch_directives, use_cluster, write_point)
from launch.submit import show
from launch.summary import dry_run_summary


def add_arguments(parser: argparse.ArgumentParser, command_name: str) -> None:
    add_request_arguments(parser, cluster_required=False)  # main() asks for --cluster without --local
    parser.add_argument("--local", action="store_true", help="run the points on this machine (no SLURM)")
    parser.add_argument("--nproc", type=int, default=1, help="with --local: processes (ranks) per point")
    parser.add_argument("--parallel", type=int, default=1, help="with --local: points run at a time (default 1)")


def split_values(text: str) -> tuple[str, list[str]]:
    """`seed=0,1,2` -> ("seed", ["0", "1", "2"]); YAML lists/maps (`[1,2]`) stay one value."""
    key, _ = parse_override(text)
    raw = text.partition("=")[2]
    values = [raw] if raw.startswith(("[", "{")) else raw.split(",")
    if len(set(values)) != len(values):
        raise LaunchError(f"override {text!r} repeats a value; each grid point must be distinct")
    return key, values


def grid(overrides: list[str]) -> list[tuple[str, list[str]]]:
    """(point name, overrides) for each point; the name lists only the swept keys."""
    axes = [split_values(o) for o in overrides]
    swept = [(k, vs) for k, vs in axes if len(vs) > 1]
    if not swept:
        raise LaunchError("no override has several values (e.g. seed=0,1,2); use launch submit for one run")
    fixed = [f"{k}={vs[0]}" for k, vs in axes if len(vs) == 1]
    points = []
    for combo in itertools.product(*(vs for _, vs in swept)):
        pairs = [f"{k}={v}" for (k, _), v in zip(swept, combo)]
        points.append((",".join(pairs).replace("/", "_"), fixed + pairs))
    return points


@print_errors
def main(args: argparse.Namespace) -> int:
    if args.local:
        return run_local(args)
    if not args.cluster:
        raise LaunchError("--cluster PROFILE is required (or --local to run the points on this machine)")
    profile = load_profile(args.cluster)
    points = grid(args.overrides)
    sweep_dir = job_folder(args.out, Path("runs") / f"{Path(args.recipe).stem}-sweep")
    check_factory(args.trainer)
    use_cluster(profile)
    spec = build_spec(profile, args, sweep_dir.name)
    world_size = spec.nodes * spec.ntasks_per_node
    recipes = [place_paths(resolve_recipe(args.recipe, overrides, args.trainer, world_size),
                           sweep_dir / name / "run", args.trainer) for name, overrides in points]
    for recipe in recipes:
        check_data_workers(recipe, spec.cpus_per_task, f"per task of cluster profile {profile.name!r}")
    for (name, _), recipe in zip(points, recipes):
        claim_run_dir(sweep_dir / name, recipe, args.trainer)
    if args.dry_run:
        problems = None if args.no_data_check else data_problems(recipes, args.trainer)
        script = render_sbatch(spec, sweep_dir, array_size=len(points))
        print("\n".join(dry_run_summary(spec, profile, sweep_dir, dict(zip((n for n, _ in points), recipes)),
                                        args.trainer == DEFAULT_TRAINER, problems, array=True)))
        if args.full:
            for (name, _), recipe in zip(points, recipes):
                print(f"\n# point {name}\n" + yaml.safe_dump(recipe, sort_keys=False))
            print("# sbatch script\n" + script)
        else:
            print("\n# sbatch directives (--full: every point's resolved recipe and the whole sbatch script)")
            print("\n".join(sbatch_directives(script)))
        print(f"dry run: nothing submitted ({len(points)} points)")
        return 0
    if not args.no_data_check:
        for recipe in recipes:
            check_data(recipe, args.trainer)
    check_not_active(sweep_dir)
    executor = make_executor(spec, sweep_dir, profile.max_timeouts)
    with executor.batch():
        jobs = [executor.submit(TrainJob(args.trainer, recipe, str(write_point(sweep_dir / name, recipe)),
                                         str(sweep_dir / name), spec.time, profile.max_preemptions,
                                         spec.signal_delay_s))
                for (name, _), recipe in zip(points, recipes)]
    info = finish_submission(sweep_dir, jobs[0], profile, points=[name for name, _ in points])
    print(f"submitted job array {info['job_id']} with {len(jobs)} tasks, one per point ({describe(spec, profile)})")
    for (name, _), job in zip(points, jobs):
        print(f"  {job.job_id:>10}  {show(sweep_dir / name / 'run')}")
    print(f"  logs:    {show(sweep_dir / 'submitit')} (.err: training, .out: launcher)")
    print(f"  follow:  python -m launch status {show(sweep_dir)}; python -m launch tail {show(sweep_dir)}")
    print(f"  stop:    python -m launch cancel {show(sweep_dir)} (saves checkpoints; submit again to resume)")
    print(f"  compare: python -m launch compare {show(sweep_dir)}/*/run")
    return 0


# --- local mode ----------------------------------------------------------------------------
def run_local(args: argparse.Namespace) -> int:
    """Every point checked first, then run as `launch run` processes, args.parallel at a time."""
    if args.cluster:
        raise LaunchError("--local runs here; drop --cluster (or drop --local to submit to SLURM)")
    if args.trainer != DEFAULT_TRAINER:
        raise LaunchError("--local runs the real trainer only (launch run)")
    if args.nproc < 1 or args.parallel < 1:
        raise LaunchError(f"--nproc ({args.nproc}) and --parallel ({args.parallel}) must be at least 1")
    points = grid(args.overrides)
    sweep_dir = job_folder(args.out, Path("runs") / f"{Path(args.recipe).stem}-sweep")
    recipes = [resolve_recipe(args.recipe, overrides, args.trainer, args.nproc) for _, overrides in points]
    for (name, _), recipe in zip(points, recipes):
        check_data_workers(recipe, local_cores(), "a rank gets here")
        claim_run_dir(sweep_dir / name, recipe, args.trainer)
    pending = []
    for (name, _), recipe in zip(points, recipes):
        if finished(sweep_dir / name / "run", recipe["train"]["max_steps"]):
            print(f"point {name}: finished before, skipped")
        else:
            pending.append((name, write_point(sweep_dir / name, recipe)))
    failed, signum = _run_points(pending, args.nproc, args.parallel)
    if signum:
        print(f"launch sweep: {signal.Signals(signum).name} received: the running points stopped (saving a "
              f"checkpoint where training had begun), no new point started; run the same command to resume", file=sys.stderr)
        return 128 + signum
    if failed:
        print(f"launch sweep: {len(failed)} point(s) failed: {', '.join(failed)}; see their launch.log",
              file=sys.stderr)
        return 1
    print(f"all {len(points)} points finished; compare: python -m launch compare {show(sweep_dir)}")
    return 0


def finished(run_dir: Path, max_steps: int) -> bool:
    """Whether the run in `run_dir` completed: its latest checkpoint is at max_steps (0:
    an epoch budget, any step) and TensorBoard holds the validation at that step and the
    hparams a completed run logs last."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vsgd_dist.train.checkpoint import latest_checkpoint, read_meta

    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is None or not (run_dir / "tb").is_dir():
        return False
    step = read_meta(checkpoint)["step"]
    if max_steps and step != max_steps:
        return False
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    return ("hparam/val_top1" in tags and "val/top1" in tags
            and any(e.step == step for e in events.Scalars("val/top1")))


def _run_points(pending: list[tuple[str, Path]], nproc: int, parallel: int) -> tuple[list[str], int | None]:
    """Run each (name, run folder) as `launch run` in its own session (its log in the point
    folder), `parallel` at a time; return the failed names and the stop signal received."""
    received: list[int] = []
    running: dict[str, tuple[subprocess.Popen, Path]] = {}  # name: (launch run, its log)

    def forward(signum, frame):  # a second signal is forwarded too: launch run then kills its ranks
        received.append(signum)
        for proc, _ in running.values():
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    failed, queue, parent = [], list(pending), os.getpid()
    try:
        while running or (queue and not received):
            while queue and len(running) < parallel and not received:
                name, run_dir = queue.pop(0)
                log = run_dir.parent / "launch.log"
                with open(log, "a") as out:
                    proc = subprocess.Popen([sys.executable, "-m", "launch", "run", str(run_dir.parent / "recipe.yaml"),
                                             "--nproc", str(nproc), f"out={run_dir}"],
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=lambda: die_with_parent(parent))
                running[name] = proc, log
                print(f"point {name}: started (log: {show(log)})", flush=True)
            for name, (proc, log) in list(running.items()):
                if proc.poll() is not None:
                    del running[name]
                    print(f"point {name}: {_last_line(log)}", flush=True)
                    if proc.returncode and not received:
                        failed.append(name)
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return failed, received[0] if received else None


def _last_line(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines()
    return lines[-1].removeprefix("launch run: ") if lines else "no output"
