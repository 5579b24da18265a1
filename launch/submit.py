"""`python -m launch submit RECIPE --cluster PROFILE ...`: one training run as one SLURM job.

Every task runs launch.job.TrainJob, which requeues the job on preemption or timeout after
the trainer has saved a step-exact checkpoint in the job folder's run/. Before anything is
queued, the request is checked as `launch run` checks it (launch/preflight.py).
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import yaml

from launch.clusters import load_profile
from launch.job import TrainJob
from launch.preflight import check_data, data_problems, place_paths
from launch.resolve import DEFAULT_TRAINER, check_data_workers, resolve_recipe
from launch.slurm import (add_request_arguments, build_spec, check_factory, check_not_active, claim_run_dir,
                          describe, finish_submission, job_folder, make_executor, print_errors, render_sbatch,
                          sbatch_directives, use_cluster, write_point)
from launch.summary import dry_run_summary


def add_arguments(parser: argparse.ArgumentParser, command_name: str) -> None:
    add_request_arguments(parser)


def show(path: Path) -> str:
    """A path as the user should type it: relative to here when inside, shell-quoted."""
    try:
        path = path.relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.quote(str(path))


@print_errors
def main(args: argparse.Namespace) -> int:
    profile = load_profile(args.cluster)
    job_dir = job_folder(args.out, Path("runs") / Path(args.recipe).stem)
    check_factory(args.trainer)
    use_cluster(profile)
    spec = build_spec(profile, args, job_dir.name)
    recipe = resolve_recipe(args.recipe, args.overrides, args.trainer, spec.world_size)
    recipe = place_paths(recipe, job_dir / "run", args.trainer)
    check_data_workers(recipe, spec.cpus_per_task, f"per task of cluster profile {profile.name!r}")
    claim_run_dir(job_dir, recipe, args.trainer)
    if args.dry_run:
        problems = None if args.no_data_check else data_problems([recipe], args.trainer)
        script = render_sbatch(spec, job_dir)
        print("\n".join(dry_run_summary(spec, profile, job_dir, {"": recipe}, args.trainer == DEFAULT_TRAINER,
                                        problems, array=False)))
        if args.full:
            print("\n# resolved recipe\n" + yaml.safe_dump(recipe, sort_keys=False))
            print("# sbatch script\n" + script)
        else:
            print("\n# sbatch directives (--full: the whole resolved recipe and sbatch script)")
            print("\n".join(sbatch_directives(script)))
        print("dry run: nothing submitted")
        return 0
    if not args.no_data_check:
        check_data(recipe, args.trainer)
    check_not_active(job_dir)
    run_dir = write_point(job_dir, recipe)
    executor = make_executor(spec, job_dir, profile.max_timeouts)
    job = executor.submit(TrainJob(args.trainer, recipe, str(run_dir), str(job_dir), spec.time,
                                   profile.max_preemptions, spec.signal_delay_s))
    info = finish_submission(job_dir, job, profile, points=[])
    print(f"submitted job {info['job_id']} ({describe(spec, profile)})")
    print(f"  job folder:  {show(job_dir)}")
    print(f"  logs:        {show(Path(job.paths.stderr))} (rank 0's training log; .out: the launcher's)")
    print(f"  tensorboard: tensorboard --logdir {show(run_dir)}")
    print(f"  follow:      python -m launch status {show(job_dir)}; python -m launch tail {show(job_dir)}")
    print(f"  stop:        python -m launch cancel {show(job_dir)} (saves a checkpoint; submit again to resume)")
    return 0
