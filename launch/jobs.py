"""`python -m launch status|tail|cancel JOB_OR_FOLDER`: follow a submitted job.

A job folder (what `submit`/`sweep` print) names its job through job.json; a bare job id
is looked up in SLURM, and its folder is found from the job comment that `submit` sets.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from collections import deque
from pathlib import Path

from launch.clusters import LaunchError, load_profile
from launch.job import INTERRUPTIONS_FILE
from launch.slurm import LOCAL_ENV, print_errors, read_job_file, slurm_cmd, use_cluster

_JOB_ID = re.compile(r"^\d+(_\d+)?$")
SACCT_FIELDS = "JobID,JobName,Partition,State,Elapsed,NodeList,ExitCode"


def add_arguments(parser: argparse.ArgumentParser, command_name: str) -> None:
    parser.add_argument("target", metavar="JOB_OR_FOLDER", help="job id (e.g. 12 or 12_3) or job folder")
    parser.add_argument("--cluster", help="cluster profile (default: the job folder's; for a bare id, "
                                          "the local cluster if it runs, else your SLURM environment)")
    if command_name == "tail":
        parser.add_argument("-n", "--lines", type=int, default=20, help="lines per log (default 20)")
        parser.add_argument("--stderr", action="store_true", help="show the .err log instead of .out")
        parser.add_argument("--rank", type=int, default=0, help="task (global rank) whose log to show")


def connect(args: argparse.Namespace, info: dict | None) -> None:
    """Point SLURM commands at the job's cluster."""
    name = args.cluster or (info or {}).get("cluster")
    if name:
        use_cluster(load_profile(name))
    elif "SLURM_CONF" not in os.environ and LOCAL_ENV.is_file():
        use_cluster(load_profile("local"))


def find_job(args: argparse.Namespace) -> tuple[str, Path | None]:
    """(job id, job folder or None) for a job id or a job folder."""
    path = Path(args.target)
    if path.is_dir():
        info = read_job_file(path)
        if info is None:
            raise LaunchError(f"{path} has no job.json; give a folder printed by launch submit/sweep, or a job id")
        connect(args, info)
        return info["job_id"], path.resolve()
    if not _JOB_ID.match(args.target):
        raise LaunchError(f"{args.target!r} is neither a job folder nor a job id (e.g. 12 or 12_3)")
    connect(args, None)
    out = slurm_cmd("sacct", "-n", "-X", "-P", "-j", args.target, "-o", "Comment", check=False).split("\n")
    folder = next((Path(c) for c in out if c and Path(c, "job.json").is_file()), None)
    return args.target, folder


def status(args: argparse.Namespace) -> int:
    job_id, folder = find_job(args)
    out = slurm_cmd("sacct", "-D", "-X", "-P", "-j", job_id, "-o", SACCT_FIELDS)
    rows = [line.split("|") for line in out.strip().splitlines()]
    if len(rows) < 2:
        raise LaunchError(f"sacct knows no job {job_id}; check the id (or --cluster)")
    header, rows = rows[0], rows[1:]
    attempts: dict[str, int] = {}
    for row in rows:  # -D lists every run of a requeued job: the last line is the current one
        attempts[row[0]] = attempts.get(row[0], 0) + 1
    latest = {row[0]: row for row in rows}
    widths = [max(len(r[i]) for r in [header, *latest.values()]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header + ["Requeues"], widths + [8])))
    for jid, row in latest.items():
        print("  ".join(c.ljust(w) for c, w in zip(row + [str(attempts[jid] - 1)], widths + [8])))
    if folder:
        print(f"job folder: {folder}")
        for events_file in sorted(folder.glob(f"**/{INTERRUPTIONS_FILE}")):
            events = json.loads(events_file.read_text())
            kinds = ", ".join(f"{e['kind']} at step {e['step']}" for e in events)
            print(f"  {events_file.parent.relative_to(folder.parent)}: {kinds}")
    return 0


def tail(args: argparse.Namespace) -> int:
    job_id, folder = find_job(args)
    if folder is None:
        raise LaunchError(f"no job folder known for job {job_id}; pass the folder printed by launch submit")
    suffix = "err" if args.stderr else "out"
    is_array = "_" not in job_id and (read_job_file(folder) or {}).get("array")
    pattern = f"{job_id}{'_*' if is_array else ''}_{args.rank}_log.{suffix}"  # an array: every task
    logs = sorted((folder / "submitit").glob(pattern))
    if not logs:
        raise LaunchError(f"no log {pattern} in {folder / 'submitit'} yet; the job may still be pending")
    for log in logs:
        if len(logs) > 1:
            print(f"==> {log} <==")
        with log.open(errors="replace") as f:
            print("".join(deque(f, maxlen=args.lines)), end="")
    return 0


def cancel(args: argparse.Namespace) -> int:
    job_id, _ = find_job(args)
    if not slurm_cmd("squeue", "-h", "-j", job_id, "-o", "%i", check=False).strip():
        states = slurm_cmd("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State", check=False).split()
        known = f"it ended {states[-1]}" if states else "SLURM knows no such job: check the id, or --cluster"
        raise LaunchError(f"job {job_id} is not queued or running ({known}); nothing cancelled")
    slurm_cmd("scancel", job_id)
    print(f"cancelled job {job_id}")
    return 0


@print_errors
def main(args: argparse.Namespace) -> int:
    return {"status": status, "tail": tail, "cancel": cancel}[args.command](args)
