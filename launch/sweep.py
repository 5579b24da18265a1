"""`python -m launch sweep RECIPE --cluster PROFILE ... optimizer=vsgd,adamw seed=0,1,2`.

Every comma-separated override multiplies the grid; the cartesian product is submitted as
ONE SLURM job array (one array task per point), each point with its own folder named from
its values, e.g. `optimizer=vsgd,seed=0/` holding recipe.yaml and run/.
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import yaml

from launch.clusters import LaunchError, load_profile
from launch.job import TrainJob
from launch.resolve import check_data_workers, parse_override, resolve_recipe
from launch.slurm import (add_request_arguments, build_spec, check_factory, check_not_active, claim_run_dir,
                          describe, finish_submission, job_folder, make_executor, print_errors, render_sbatch,
                          use_cluster, write_point)
from launch.submit import show


def add_arguments(parser: argparse.ArgumentParser, command_name: str) -> None:
    add_request_arguments(parser)


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
    profile = load_profile(args.cluster)
    points = grid(args.overrides)
    sweep_dir = job_folder(args.out, Path("runs") / f"{Path(args.recipe).stem}-sweep")
    check_factory(args.trainer)
    use_cluster(profile)
    spec = build_spec(profile, args, sweep_dir.name)
    world_size = spec.nodes * spec.ntasks_per_node
    recipes = [resolve_recipe(args.recipe, overrides, args.trainer, world_size) for _, overrides in points]
    for recipe in recipes:
        check_data_workers(recipe, spec.cpus_per_task, f"per task of cluster profile {profile.name!r}")
    for (name, _), recipe in zip(points, recipes):
        claim_run_dir(sweep_dir / name, recipe, args.trainer)
    if args.dry_run:
        for (name, overrides), recipe in zip(points, recipes):
            print(f"# point {name}\n" + yaml.safe_dump(recipe, sort_keys=False))
        print("# sbatch script\n" + render_sbatch(spec, sweep_dir, array_size=len(points)))
        print(f"dry run: nothing submitted ({len(points)} points)")
        return 0
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
    print(f"  logs:    {show(sweep_dir / 'submitit')}")
    print(f"  follow:  python -m launch status {show(sweep_dir)}")
    print(f"  compare: python -m launch compare {show(sweep_dir)}/*/run")
    return 0
