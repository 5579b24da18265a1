"""`python -m launch status|tail|cancel JOB_OR_FOLDER`: follow a submitted job.

A job folder (what `submit`/`sweep` print) names its job and its cluster through job.json;
a bare job id is looked up in SLURM, and its folder is found from the job comment that
`submit` sets.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections import deque
from pathlib import Path

from launch.clusters import LaunchError, load_profile
from launch.job import CANCEL_FILE, INTERRUPTIONS_FILE
from launch.slurm import LOCAL_ENV, print_errors, read_job_file, slurm_cmd, use_cluster

_JOB_ID = re.compile(r"^\d+(_\d+)?$")
SACCT_FIELDS = "JobID,JobName,Partition,State,Elapsed,NodeList,ExitCode"
FAILED_STATES = ("FAILED", "OUT_OF_MEMORY", "NODE_FAIL", "TIMEOUT")
ERROR_LINE = re.compile(r"^(\w+\.)*\w*(Error|Exception|Interrupt)\b|^launch: (error|not requeueing)|"
                        r"^(python -m )?launch \w+: error|Error: |^srun: error: .*(Killed|signal)|^slurmstepd: error")


def add_arguments(parser: argparse.ArgumentParser, command_name: str) -> None:
    parser.add_argument("target", metavar="JOB_OR_FOLDER", help="job id (e.g. 12 or 12_3) or job folder")
    parser.add_argument("--cluster", help="cluster profile, a name or a YAML path (default: the one the job "
                                          "folder's job.json records; for a bare id, the local cluster if it "
                                          "runs, else your SLURM environment)")
    if command_name == "tail":
        parser.add_argument("-n", "--lines", type=int, default=20, help="lines per log (default 20)")
        parser.add_argument("--launcher", action="store_true",
                            help="show the launcher's .out log (submitit, rank lines) instead of the training "
                                 "log (.err: progress, loss, errors)")
        parser.add_argument("--rank", type=int, default=0, help="task (global rank) whose log to show")
    if command_name == "cancel":
        parser.add_argument("--now", action="store_true",
                            help="cancel at once, without the checkpoint (the work since the last one is lost)")
        parser.add_argument("--wait", type=int, default=None,
                            help="seconds to wait for the checkpoint before cancelling anyway "
                                 "(default: the profile's signal_delay_s + 60)")


def connect(args: argparse.Namespace, info: dict | None) -> None:
    """Point SLURM commands at the job's cluster: --cluster, else the SLURM_CONF the job was
    submitted with (job.json), else its profile; a bare id without --cluster uses the local
    cluster when it runs."""
    if args.cluster:
        use_cluster(load_profile(args.cluster))
        return
    if info is None:
        if "SLURM_CONF" not in os.environ and LOCAL_ENV.is_file():
            use_cluster(load_profile("local"))
        return
    conf = info.get("slurm_conf")
    if conf and Path(conf).is_file():
        os.environ["SLURM_CONF"] = conf
    elif conf:
        raise LaunchError(f"the job's cluster is not running: its SLURM config {conf} (job.json) is gone; "
                          f"start that cluster again, or pass --cluster")
    elif info.get("cluster"):
        source = info.get("cluster_profile")
        use_cluster(load_profile(source if source and Path(source).is_file() else info["cluster"]))


def find_job(args: argparse.Namespace) -> tuple[str, Path | None, dict | None]:
    """(job id, job folder or None, its job.json or None) for a job id or a job folder."""
    path = Path(args.target)
    if path.is_dir():
        info = read_job_file(path)
        if info is None:
            raise LaunchError(f"{path} has no job.json; give a folder printed by launch submit/sweep, or a job id")
        connect(args, info)
        return info["job_id"], path.resolve(), info
    if path.exists():
        raise LaunchError(f"{path} is a file; give a job folder (printed by launch submit/sweep) or a job id")
    if not _JOB_ID.match(args.target):
        raise LaunchError(f"{args.target!r} is neither a job folder nor a job id (e.g. 12 or 12_3)")
    connect(args, None)
    out = slurm_cmd("sacct", "-n", "-X", "-P", "-j", args.target, "-o", "Comment", check=False).split("\n")
    folder = next((Path(c) for c in out if c and Path(c, "job.json").is_file()), None)
    return args.target, folder, read_job_file(folder) if folder else None


def last_error(folder: Path, job_id: str) -> tuple[Path, str] | None:
    """The last error-looking line of the job's task logs (.err first, where Python writes
    tracebacks), with its log."""
    found = None
    for log in sorted((folder / "submitit").glob(f"{job_id}_*_log.*"), key=lambda p: (p.suffix != ".err", p.name)):
        with log.open(errors="replace") as f:
            for line in f:
                line = line.strip()
                if ERROR_LINE.search(line):
                    found = (log, line)
        if found:
            return found
    return None


def status(args: argparse.Namespace) -> int:
    job_id, folder, _ = find_job(args)
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
        for jid, row in latest.items():
            if row[header.index("State")].split()[0] in FAILED_STATES:
                error = last_error(folder, jid)
                print(f"  {jid} failed: " + (f"{error[1]} (in {error[0]})" if error else
                                             "no error line in its logs; see python -m launch tail"))
    return 0


def clean(lines: list[str]) -> str:
    """Log lines as a terminal would show them: a progress bar's carriage-return updates
    collapse to the last one."""
    return "".join(line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r\n") else line for line in lines)


def tail(args: argparse.Namespace) -> int:
    job_id, folder, info = find_job(args)
    if folder is None:
        raise LaunchError(f"no job folder known for job {job_id}; pass the folder printed by launch submit")
    suffix = "out" if args.launcher else "err"
    is_array = "_" not in job_id and (info or {}).get("array")
    pattern = f"{job_id}{'_*' if is_array else ''}_{args.rank}_log.{suffix}"  # an array: every task
    logs = sorted((folder / "submitit").glob(pattern))
    if not logs:
        raise LaunchError(f"no log {pattern} in {folder / 'submitit'} yet; the job may still be pending")
    for log in logs:
        if len(logs) > 1:
            print(f"==> {log} <==")
        with log.open(errors="replace", newline="") as f:
            print(clean(list(deque(f, maxlen=args.lines))), end="")
    return 0


def queued(job_id: str) -> dict[str, str]:
    """Job (or array task) id -> squeue state, for what is still queued or running."""
    out = slurm_cmd("squeue", "-h", "-j", job_id, "-o", "%i|%T", check=False)
    return dict(line.split("|", 1) for line in out.split() if "|" in line)


def cancel(args: argparse.Namespace) -> int:
    job_id, folder, info = find_job(args)
    now = queued(job_id)
    if not now:
        states = slurm_cmd("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State", check=False).split()
        known = f"it ended {states[-1]}" if states else "SLURM knows no such job: check the id, or --cluster"
        raise LaunchError(f"job {job_id} is not queued or running ({known}); nothing cancelled")
    running = [jid for jid, state in now.items() if state in ("RUNNING", "COMPLETING")]
    if args.now or not running or folder is None:
        slurm_cmd("scancel", job_id)
        why = ("--now: without a checkpoint" if args.now else "it had not started: nothing to keep" if not running
               else "no job folder known (a job not submitted by launch submit): without a checkpoint")
        print(f"cancelled job {job_id} ({why}); {kept(folder, info)}")
        return 0
    if len(running) < len(now):  # array tasks still waiting have nothing to save
        slurm_cmd("scancel", "--state=PENDING", job_id)
    for point in point_folders(folder, info):
        (point / CANCEL_FILE).write_text(f"{time.time()}\n")
    slurm_cmd("scancel", "--signal=USR2", job_id)  # the job's own stop path: save, then cancel itself
    wait = args.wait if args.wait is not None else profile_delay(info) + 60
    deadline = time.time() + wait
    while queued(job_id) and time.time() < deadline:
        time.sleep(1)
    late = bool(queued(job_id))
    if late:
        slurm_cmd("scancel", job_id)
    print(f"cancelled job {job_id}" + (f" after waiting {wait} s for its checkpoint" if late else
                                       " after it saved a checkpoint") + f"; {kept(folder, info)}")
    return 0


def point_folders(folder: Path, info: dict | None) -> list[Path]:
    """The folders of the job's runs: the job folder, or each point of a sweep."""
    points = (info or {}).get("points") or []
    return [folder / p for p in points] if points else [folder]


def profile_delay(info: dict | None) -> int:
    try:
        source = (info or {}).get("cluster_profile") or (info or {}).get("cluster")
        return load_profile(source).signal_delay_s if source else 120
    except LaunchError:
        return 120


def kept(folder: Path | None, info: dict | None) -> str:
    """What the job leaves to resume from: each run's stop step (its record in
    interruptions.json) and latest checkpoint folder."""
    if folder is None:
        return "its folder is unknown, so nothing to report about checkpoints"
    from vsgd_dist.train.checkpoint import latest_checkpoint

    found = []
    for point in point_folders(folder, info):
        events = json.loads((point / INTERRUPTIONS_FILE).read_text()) if (point / INTERRUPTIONS_FILE).is_file() else []
        stop = events[-1] if events and events[-1]["kind"] == "cancel" else None
        latest = latest_checkpoint(point / "run" / "checkpoints")
        if stop and stop["step"] is not None:
            found.append(f"step {stop['step']} in {latest or point / 'run'}")
        elif latest:
            found.append(str(latest))
    if not found:
        return "no checkpoint was saved"
    return f"kept {', '.join(found)}; submit the same command with the same --out to resume"


@print_errors
def main(args: argparse.Namespace) -> int:
    return {"status": status, "tail": tail, "cancel": cancel}[args.command](args)
