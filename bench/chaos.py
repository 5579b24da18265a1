"""Chaos run: many faults injected into one training job on the local multi-node SLURM
cluster, which must end with the same weights and optimizer state as an undisturbed run.

    python bench/chaos.py --faults K --seed S

Starts its own 2-node cluster (slurm/local/start.sh --nodes 2) in a work folder, with the run
folders on a small tmpfs of their own (the disk that fills up), trains the demo recipe once
undisturbed (the reference) and once as the chaos job, 2 nodes x 2 tasks. While the chaos job
trains, K faults drawn from the seed hit it at random times: SIGKILL or SIGSTOP of one rank,
SIGTERM to the batch step, USR2 preemptions (some while a checkpoint is being written), the
loss of a whole node (its slurmd and processes killed; every other time the job goes on
without it, on the node left with half the ranks, else the node is restored once SLURM has
requeued the job), the disk filling up before a save, one byte of the latest checkpoint
flipped between two attempts, and the network of one node cut for longer than the step
watchdog's timeout. Every fault is printed with its time, kind and target as it happens.
SLURM requeues what it requeues; a job that ends otherwise is resubmitted into the same job
folder, as a user would (after following the one-line error, e.g. deleting a checkpoint that
fails its checksum), within a bound on attempts and on total time.

At the end it checks what no fault may leave behind: the final checkpoint equal bit for bit
to the reference's (after a world-size change, to an undisturbed run with the same changes),
every published checkpoint matching its checksums, every TensorBoard step logged once and
none missing, no process of the jobs, no SLURM job, network namespace, link or mount left.
It prints a table and, last, the line

    chaos: K faults injected, N survived, A attempts, L steps recomputed, final state equal: yes|no

and exits 0 only when every fault was survived and the state is equal. docs/reliability.md
says what "survived" means for each kind.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("kill_rank", "stop_rank", "term_batch", "preempt", "preempt_in_save", "lose_node", "disk_full",
         "corrupt_ckpt", "net_cut")
"""Every fault the harness injects (docs/reliability.md describes each)."""
CHEAP_KINDS = ("kill_rank", "stop_rank", "term_batch", "preempt", "preempt_in_save", "disk_full", "corrupt_ckpt")
"""Kinds that cost seconds, not SLURM's node timeout: the default of a short run."""
QUEUED = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}
DEFAULT_PORTS = {"SLURM_LOCAL_CTLD_PORT": "6857", "SLURM_LOCAL_SLURMD_PORT": "6858",
                 "SLURM_LOCAL_DBD_PORT": "6859", "SLURM_LOCAL_DB_PORT": "3347"}
"""The cluster's ports unless the environment sets them (another cluster may use the defaults)."""
SLURMD_SOCKET = "cluster/slurm/spool/node1/node1_4294967294.4294967291"
"""The longest socket path slurmstepd makes under the work folder (a Unix socket path has
at most SOCKET_PATH_MAX bytes: a longer one fails every job launch)."""
SOCKET_PATH_MAX = 107
TASKS_PER_NODE = 2
UNSEEDED_RNGS = ("python", "numpy")
"""Global RNGs the trainer never seeds nor draws from: left out of the comparison."""


@dataclass
class ChaosConfig:
    """One chaos run."""

    faults: int
    """How many faults to inject."""
    seed: int
    """Draws the kinds, order, delays and targets of the faults: the same seed replays them."""
    kinds: tuple[str, ...]
    """Kinds to draw from; when `faults` >= their number, each kind is injected at least once."""
    steps: int
    """Training steps of the job (the reference trains the same recipe)."""
    ckpt_every: int
    """Checkpoint cadence in steps; a fault waits for a checkpoint newer than the last fault's."""
    hang_timeout_s: float
    """train.hang_timeout_s: the step watchdog that names a frozen rank and ends a hung collective."""
    max_attempts: int
    """Bound on SLURM runs of the job (requeues and resubmissions together)."""
    time_limit_s: float
    """Bound on the whole chaos job, from its submission to its completion."""
    workdir: Path
    """Cluster folder, run file system and log live here."""
    keep: bool
    """Keep the work folder (runs, logs) afterwards."""
    reference: Path | None
    """An earlier reference job folder of the same recipe to reuse instead of training one."""
    record: bool = False
    """Write the table and the log to results/chaos.md (under the machine it ran on)."""


@dataclass
class Fault:
    index: int
    kind: str
    delay_s: float
    """Seconds after the fault's trigger (a new checkpoint) before it strikes."""
    pick: int
    """Draw that chooses the target (rank, node, file, byte)."""
    at_s: float | None = None
    target: str = ""
    attempt: int = 0
    checks: list[str] = field(default_factory=list)
    """What this kind must show (e.g. the watchdog naming the rank); failed ones are listed."""
    recovered_s: float | None = None

    @property
    def survived(self) -> bool:
        return self.at_s is not None and self.recovered_s is not None and not self.checks


def plan(cfg: ChaosConfig) -> list[Fault]:
    """The faults, from the seed alone: every kind once if there is room, then random ones;
    a corrupted checkpoint strikes between two attempts, so it never comes first."""
    rng = random.Random(cfg.seed)
    kinds = list(cfg.kinds) if cfg.faults >= len(cfg.kinds) else rng.sample(cfg.kinds, cfg.faults)
    kinds += [rng.choice(cfg.kinds) for _ in range(cfg.faults - len(kinds))]
    rng.shuffle(kinds)
    for i, kind in enumerate(kinds):  # move a leading corrupt_ckpt behind the first other fault
        if kind != "corrupt_ckpt":
            if i:
                kinds[0], kinds[i] = kinds[i], kinds[0]
            break
    return [Fault(i, kind, round(rng.uniform(0, 3), 2), rng.randrange(1 << 30)) for i, kind in enumerate(kinds)]


class ChaosError(RuntimeError):
    """The run cannot go on (a bound was passed, the cluster broke); the message says why."""


# --- the cluster and its jobs --------------------------------------------------------------
class LocalCluster:
    """slurm/local/start.sh --nodes 2 in `folder`, with its own ports and address range."""

    def __init__(self, folder: Path, log):
        self.folder, self.log = folder, log
        self.env = {**os.environ, **{k: os.environ.get(k, v) for k, v in DEFAULT_PORTS.items()},
                    "VSGD_SLURM_LOCAL": str(folder)}
        self.env.setdefault("SLURM_LOCAL_NET", free_net())
        self.env.pop("SLURM_CONF", None)

    def start(self) -> None:
        res = subprocess.run(["bash", str(REPO / "slurm/local/start.sh"), "--nodes", "2", str(self.folder)],
                             env=self.env, capture_output=True, text=True, timeout=900)
        if res.returncode:
            raise ChaosError(f"slurm/local/start.sh failed: {res.stderr.strip()[-400:]}")
        self.env["SLURM_CONF"] = str(self.folder / "slurm" / "slurm.conf")

    def stop(self) -> None:
        subprocess.run(["bash", str(REPO / "slurm/local/stop.sh"), str(self.folder)], env=self.env,
                       capture_output=True, text=True, timeout=300)

    def slurm(self, *argv: str, check: bool = True) -> str:
        res = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60)
        if check and res.returncode:
            raise ChaosError(f"{' '.join(argv)}: {res.stderr.strip()}")
        return res.stdout

    def created(self) -> list[tuple[str, str]]:
        path = self.folder / "net" / "created"
        return [tuple(line.split()) for line in path.read_text().splitlines()] if path.exists() else []

    def netns(self, node: str) -> str:
        return next(name for kind, name in self.created() if kind == "netns" and name.endswith(f"-{node}"))

    def veth(self, node: str) -> str:
        return [name for kind, name in self.created() if kind == "veth"][int(node.removeprefix("node")) - 1]

    def submit(self, job_dir: Path, overrides: list[str], nodes: int = 2) -> str:
        env = {k: v for k, v in self.env.items() if k != "SLURM_CONF"}
        try:
            res = subprocess.run([sys.executable, "-m", "launch", "submit", "recipes/demo.yaml", "--cluster", "local",
                                  "--time", "20", "--nodes", str(nodes), "--tasks-per-node", str(TASKS_PER_NODE),
                                  "--out", str(job_dir),
                                  *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise ChaosError("launch submit did not return within 600 s (is the machine overloaded?)") from None
        if res.returncode:
            raise ChaosError(f"launch submit failed: {res.stderr.strip()}")
        return json.loads((job_dir / "job.json").read_text())["job_id"]

    def queued_state(self, jid: str) -> str | None:
        """The job's squeue state, or None once SLURM holds nothing of it. A squeue that
        fails otherwise (slurmctld busy while it requeues) says "UNKNOWN", not gone."""
        res = subprocess.run(["squeue", "-h", "-j", jid, "-o", "%T"], env=self.env, capture_output=True, text=True,
                             timeout=60)
        if res.returncode and "Invalid job id" not in res.stderr:
            return "UNKNOWN"
        out = res.stdout.split()
        return out[0] if out else None

    def runs(self, jid: str) -> list[str]:
        """States of every run of `jid`, requeued ones included, oldest first."""
        return self.slurm("sacct", "-D", "-X", "-n", "-P", "-j", jid, "-o", "State").split()

    def final_state(self, jid: str) -> str:
        runs = self.runs(jid)
        return runs[-1] if runs else "UNKNOWN"

    def held_after_a_failed_launch(self, jid: str) -> bool:
        return self.slurm("squeue", "-h", "-j", jid, "-o", "%r", check=False).strip() == "launch failed requeued held"

    def resume_drained_nodes(self) -> list[str]:
        """What an administrator does after a failed launch: put the drained nodes back."""
        drained = self.slurm("sinfo", "-h", "-N", "-t", "drain", "-o", "%N").split()
        for node in drained:
            self.slurm("scontrol", "update", f"nodename={node}", "state=resume")
        return drained

    def restore_node(self) -> None:
        """start.sh again: starts the slurmd that is missing (the lost node); it may take
        SLURM a while to take a node it marked DOWN back."""
        for attempt in range(3):
            try:
                return self.start()
            except ChaosError as e:
                self.log(f"restoring the node, try {attempt + 1}: {e}")
                time.sleep(10)
        raise ChaosError("the lost node did not come back after three tries of slurm/local/start.sh")


def free_net() -> str:
    """The first 10.213.X.0/24 (X >= 40) no interface here has an address in."""
    addrs = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, timeout=30).stdout
    used = set(re.findall(r"inet 10\.213\.(\d+)\.", addrs))
    return next(f"10.213.{x}.0/24" for x in range(40, 255) if str(x) not in used)


def job_processes(jids: set[str]) -> dict[int, dict]:
    """{pid: its SLURM environment} of every process of these jobs' tasks."""
    from vsgd_dist.compat.submitit import SUBMIT_MODULE

    submit_module, found = SUBMIT_MODULE.encode(), {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        env = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
        if env.get("SLURM_JOB_ID") in jids and submit_module in cmdline:
            found[int(entry.name)] = env
    return found


def rank_pids(jid: str, run: str | None = None) -> dict[int, tuple[int, str]]:
    """{rank: (pid, node)} of the running tasks of job `jid` (of its run `run` only: SLURM's
    restart count, "0" before the first requeue)."""
    return {int(env["SLURM_PROCID"]): (pid, env.get("SLURMD_NODENAME", "?"))
            for pid, env in job_processes({jid}).items()
            if "SLURM_PROCID" in env and run in (None, env.get("SLURM_RESTART_COUNT", "0"))}


def runs_alive(jid: str) -> set[str]:
    """SLURM restart counts of the runs of `jid` whose tasks are alive."""
    return {env.get("SLURM_RESTART_COUNT", "0") for env in job_processes({jid}).values()}


def describe(tasks: dict[int, tuple[int, str]]) -> str:
    """Rank, pid, node and process state (R, S, D, T, Z) of tasks, for a message about what
    outlived a bound."""
    parts = []
    for rank, (pid, node) in sorted(tasks.items()):
        with contextlib.suppress(OSError):
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            parts.append(f"rank {rank} pid {pid} on {node} ({state})")
    return ", ".join(parts) or "none"


def network_objects() -> set[str]:
    ip = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=30).stdout
    links = {line.split(":")[1].strip().split("@")[0] for line in ip.splitlines()}
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return links | {f"netns {line.split()[0]}" for line in netns.splitlines() if line}


# --- the run folder ------------------------------------------------------------------------
def checkpoints(run_dir: Path) -> list[Path]:
    """Published checkpoints, oldest first."""
    return sorted(p for p in (run_dir / "checkpoints").glob("step_*") if p.suffix != ".tmp"
                  and (p / "meta.json").is_file())


def latest_step(run_dir: Path) -> int:
    found = checkpoints(run_dir)
    return int(found[-1].name.removeprefix("step_")) if found else 0


def heartbeat_step(job_dir: Path, jid: str) -> int:
    """The highest step any rank of `jid` reported in its heartbeat (launch.watchdog.TaskWatchdog)."""
    steps = [0]
    for file in (job_dir / "submitit").glob(f"{jid}_*_heartbeat.json"):
        with contextlib.suppress(OSError, ValueError):
            steps.append(int(json.loads(file.read_text()).get("step") or 0))
    return max(steps)


def training_step(job_dir: Path, jid: str) -> int | None:
    """The step rank 0 of `jid` trains at now (its heartbeat is fresh), else None."""
    with contextlib.suppress(OSError, ValueError):
        beat = json.loads((job_dir / "submitit" / f"{jid}_0_heartbeat.json").read_text())
        if time.time() - beat["time"] < 5 and beat.get("step") is not None:
            return int(beat["step"])
    return None


def logs_of(job_dir: Path, jid: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((job_dir / "submitit").glob(f"{jid}_*_log.*")))


def same_tree(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
                and torch.equal(a.isnan(), b.isnan()))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_tree, a, b))
    return a == b


def same_checkpoint(a: Path, b: Path) -> list[str]:
    """Parts of two checkpoints that differ (weights, optimizer state, schedule, data position,
    torch RNG): [] when equal bit for bit."""
    from vsgd_dist.train.checkpoint import read_full

    x, y = read_full(a), read_full(b)
    for full in (x, y):
        full.pop("meta")
        for trainer in full["trainer"].values():
            for rng in UNSEEDED_RNGS:
                trainer.get("rng", {}).pop(rng, None)
    if x["trainer"].keys() != y["trainer"].keys():
        return [f"{a} and {b} were written by different world sizes"]
    return [part for part in x if not same_tree(x[part], y[part])]


def tensorboard_steps(run_dir: Path) -> dict[str, list[int]]:
    """Steps of every scalar, as TensorBoard shows them (events a resumed run purged left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def bad_checksums(run_dir: Path, corrupted: set[Path]) -> list[str]:
    from vsgd_dist.train.checkpoint import CheckpointError, read_meta, verify_file

    bad = []
    for folder in checkpoints(run_dir):
        if folder in corrupted:
            continue
        try:
            meta = read_meta(folder)
            for name in meta["sha256"]:
                verify_file(folder, meta, name)
        except CheckpointError as e:
            bad.append(str(e))
    return bad


# --- the harness ---------------------------------------------------------------------------
class Chaos:
    def __init__(self, cfg: ChaosConfig):
        self.cfg = cfg
        self.faults = plan(cfg)
        self.t0 = time.time()
        self.fs = cfg.workdir / "fs"
        self.cluster = LocalCluster(cfg.workdir / "cluster", self.say)
        self.job_dir = self.fs / "chaos"
        self.jids: list[str] = []
        self.nodes_of: dict[str, int] = {}
        """Nodes each job of the chaos run asked for (fewer after a lost node, while it is down)."""
        self.fresh: set[str] = set()
        """Jobs submitted when the run had no checkpoint yet (their first run starts at step 0)."""
        self.nodes_lost = 0
        self.cut: tuple[str, float] | None = None
        self.attempt_count = 0
        self.recomputed = 0
        self.corrupted: set[Path] = set()
        self.problems: list[str] = []
        self.ballast = self.fs / "ballast"
        self.log_file = cfg.workdir / "chaos.log"
        self.said: list[str] = []

    # ---- output
    def say(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.said.append(line)
        with open(self.log_file, "a") as f:
            f.write(line + "\n")

    @property
    def overrides(self) -> list[str]:
        return ["optimizer=vsgd", f"max_steps={self.cfg.steps}", "train.global_batch=48",
                f"train.ckpt_every={self.cfg.ckpt_every}", f"train.log_every={self.cfg.ckpt_every}",
                "train.keep_checkpoints=4", "train.progress=false", f"train.hang_timeout_s={self.cfg.hang_timeout_s:g}"]

    @property
    def jid(self) -> str:
        return self.jids[-1]

    @property
    def run_dir(self) -> Path:
        return self.job_dir / "run"

    # ---- lifecycle
    def run(self) -> int:
        cfg = self.cfg
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        self.say(f"chaos: seed {cfg.seed}, {cfg.faults} faults, work folder {cfg.workdir}; replay: python "
                 f"bench/chaos.py --faults {cfg.faults} --seed {cfg.seed} --kinds {','.join(cfg.kinds)} "
                 f"--steps {cfg.steps} --ckpt-every {cfg.ckpt_every}")
        for f in self.faults:
            self.say(f"plan: fault {f.index} {f.kind} {f.delay_s} s after its trigger")
        before = network_objects()
        self.fs.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(self.fs)], check=True,
                       capture_output=True, timeout=60)
        equal = False
        try:
            self.cluster.start()
            self.say(f"cluster up in {self.cluster.folder} (net {self.cluster.env['SLURM_LOCAL_NET']}); run "
                     f"folders on a 64 MiB tmpfs at {self.fs}")
            reference, ref_s = self.reference()
            started = time.time()
            self.chaos_job()
            chaos_s = time.time() - started
            equal = self.final_checks(reference)
            self.leftover_processes()
            self.attempts()
        except (ChaosError, KeyboardInterrupt) as e:
            self.problems.append(str(e) or "interrupted")
            self.say(f"error: {e or 'interrupted'}")
            chaos_s = ref_s = 0.0
        except Exception as e:  # a defect of the harness: still clean up and report what was seen
            self.problems.append(f"harness error: {e!r}")
            self.say("harness error:\n" + traceback.format_exc())
            chaos_s = ref_s = 0.0
        finally:
            with contextlib.suppress(Exception):
                for jid in self.jids:
                    self.cluster.slurm("scancel", jid, check=False)
            self.cluster.stop()
            for _ in range(30):  # busy until the killed tasks are reaped
                if subprocess.run(["umount", str(self.fs)], capture_output=True, timeout=60).returncode == 0:
                    break
                time.sleep(1)
        self.leftovers_after_stop(before)
        return self.report(equal, max(0.0, chaos_s - ref_s))

    def reference(self) -> tuple[Path, float]:
        if self.cfg.reference:
            self.say(f"reference: reusing {self.cfg.reference}")
            return self.cfg.reference / "run", 0.0
        started = time.time()
        self.undisturbed(self.fs / "reference", [(self.cfg.steps, 2)])
        took = time.time() - started
        self.say(f"reference: COMPLETED in {took:.0f} s")
        if self.cfg.keep:  # outlives the tmpfs, for --reference
            shutil.copytree(self.fs / "reference", self.cfg.workdir / "reference", dirs_exist_ok=True)
        return self.fs / "reference" / "run", took

    def undisturbed(self, job_dir: Path, segments: list[tuple[int, int]]) -> None:
        """Train the recipe into `job_dir` without faults, segment by segment: up to each
        segment's last step (train.stop_at: a checkpoint there, the schedule unchanged) on its
        number of nodes, the next segment resuming from that checkpoint."""
        for last, nodes in segments:
            stop = [f"train.stop_at={last}"] if last < self.cfg.steps else []
            jid = self.cluster.submit(job_dir, self.overrides + stop, nodes)
            self.say(f"{job_dir.name}: job {jid}, undisturbed, {nodes * TASKS_PER_NODE} ranks up to step {last}")
            deadline = time.time() + self.cfg.time_limit_s
            while self.cluster.queued_state(jid) or self.cluster.final_state(jid) in QUEUED:  # sacct lags squeue
                if time.time() > deadline:
                    raise ChaosError(f"the {job_dir.name} job {jid} did not end within {self.cfg.time_limit_s:g} s")
                time.sleep(1)
            state = self.cluster.final_state(jid)
            if state != "COMPLETED":
                raise ChaosError(f"the {job_dir.name} job {jid} ended {state}; see {job_dir}")

    def layouts(self) -> list[tuple[int, int]]:
        """The final run's layout as segments (last step, nodes): step s was last computed by
        the last job whose first run started before s (a job's runs resume ever later, and all
        of them have its layout)."""
        starts = []
        for jid in self.jids:
            resumed = re.search(r"trainer: resumed from step (\d+)", logs_of(self.job_dir, jid))
            if jid in self.fresh:  # its first run started at step 0 (a requeued one may have resumed)
                starts.append((0, self.nodes_of[jid]))
            elif resumed:  # else the job never trained (e.g. its checkpoint failed its checksum)
                starts.append((int(resumed[1]), self.nodes_of[jid]))
        segments: list[tuple[int, int]] = []
        for step in range(1, self.cfg.steps + 1):
            nodes = next((n for start, n in reversed(starts) if start < step), 2)
            if segments and segments[-1][1] == nodes:
                segments[-1] = (step, nodes)
            else:
                segments.append((step, nodes))
        return segments

    def attempts(self) -> int:
        """Runs of the chaos job so far: its submissions and SLURM's requeues of them (the
        last count once the cluster is stopped)."""
        with contextlib.suppress(ChaosError, subprocess.SubprocessError, OSError):
            self.attempt_count = sum(len(self.cluster.runs(jid)) for jid in self.jids)
        return self.attempt_count

    def submit(self, nodes: int = 2) -> None:
        attempts = self.attempts()
        if attempts >= self.cfg.max_attempts:
            raise ChaosError(f"{attempts} attempts (--max-attempts {self.cfg.max_attempts}) and the job is "
                             "not complete")
        fresh = latest_step(self.run_dir) == 0
        self.jids.append(self.cluster.submit(self.job_dir, self.overrides, nodes))
        self.nodes_of[self.jid] = nodes
        if fresh:
            self.fresh.add(self.jid)
        self.say(f"submitted job {self.jid} into {self.job_dir}" + (f" ({nodes} node)" if nodes == 1 else ""))

    def check_time(self) -> None:
        if time.time() - self.started > self.cfg.time_limit_s:
            raise ChaosError(f"the chaos job did not complete within --time-limit {self.cfg.time_limit_s:g} s")

    # ---- the chaos job
    def chaos_job(self) -> None:
        self.started = time.time()
        self.submit()
        pending = list(self.faults)
        baseline = 0
        while True:
            self.check_time()
            state = self.follow()
            if state == "COMPLETED":
                break
            fault = pending[0] if pending else None
            if fault is None or fault.kind == "corrupt_ckpt" or state != "RUNNING":
                time.sleep(0.5)
                continue
            if not self.training_past(baseline) or (latest_step(self.run_dir) <= baseline
                                                     and fault.kind != "preempt_in_save"):
                time.sleep(0.2)  # a fault strikes a run that trains, and one checkpoint after the last fault
                continue
            if latest_step(self.run_dir) >= self.cfg.steps - self.cfg.ckpt_every:
                time.sleep(0.5)  # too close to the end for another fault to matter
                continue
            if fault.kind != "preempt_in_save":  # that one strikes when a save starts
                time.sleep(fault.delay_s)
            if self.cluster.queued_state(self.jid) != "RUNNING" or not rank_pids(self.jid):
                continue
            pending.pop(0)
            self.inject(fault)
            self.wait_attempt_end(fault)
            while pending and pending[0].kind == "corrupt_ckpt":  # between this attempt and the next
                self.corrupt(pending.pop(0))
            baseline = latest_step(self.run_dir)
        for fault in pending:
            self.say(f"fault {fault.index} {fault.kind}: not injected, the job completed first")
        self.say(f"chaos job complete after {self.attempts()} attempts, {time.time() - self.started:.0f} s")

    def training_past(self, step: int) -> bool:
        now = training_step(self.job_dir, self.jid)
        return now is not None and now > step

    def wait_for_a_save(self, pids: list[int]) -> str | None:
        """Send USR2 to `pids` as soon as a checkpoint is being written (its .tmp folder
        exists), polling every millisecond; return that folder's name, or None when three
        saves were too quick to see (then the signal goes out after the third)."""
        folder, baseline, missed, deadline = self.run_dir / "checkpoints", latest_step(self.run_dir), 0, time.time() + 120
        saving = None
        while missed < 3 and time.time() < deadline and saving is None:
            saving = next((p.name for p in folder.glob("*.tmp")), None)
            if saving is None and latest_step(self.run_dir) > baseline:
                missed, baseline = missed + 1, latest_step(self.run_dir)
            time.sleep(0.001)
        for pid in pids:  # what `scancel --signal=USR2` delivers, without its round trip to slurmctld
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR2)
        return saving

    def follow(self) -> str:
        """Keep the job going: resubmit a job that ended without completing, after following
        its one-line error. Returns "RUNNING", "WAITING" or "COMPLETED"."""
        state = self.cluster.queued_state(self.jid)
        if state == "PENDING" and self.cluster.held_after_a_failed_launch(self.jid):
            # A node back from a network cut may still hold the job's old record: slurmd refuses
            # the requeued launch ("already running"), SLURM drains the node and holds the job.
            nodes = self.cluster.resume_drained_nodes()
            self.cluster.slurm("scontrol", "release", self.jid)
            self.say(f"job {self.jid} held after a failed launch (SLURM drained {', '.join(nodes) or 'no node'}); "
                     "resumed the nodes and released the job, as an administrator would")
            return "WAITING"
        if state is not None:
            return "RUNNING" if state == "RUNNING" and rank_pids(self.jid) else "WAITING"
        final = self.cluster.final_state(self.jid)
        if final == "COMPLETED":
            return "COMPLETED"
        if final in QUEUED:  # sacct still sees a run of it (a requeue starting): no second job
            return "WAITING"
        self.operator(final)
        self.submit()
        return "WAITING"

    def operator(self, final: str) -> None:
        """What a user does with a job that ended {final}: read its one-line error and follow it."""
        logs = logs_of(self.job_dir, self.jid)
        damaged = [Path(m) for m in re.findall(r"(\S+/step_\d{8})/__\d+_\d+\.distcp does not match the checksum", logs)]
        damaged = [folder for folder in damaged if folder.exists()]  # a requeued job's log holds earlier runs
        if damaged:
            folder = damaged[-1]
            self.say(f"job {self.jid} ended {final}: a checkpoint fails its checksum; deleting {folder} as the "
                     "error says")
            self.recomputed += max(0, int(folder.name.removeprefix("step_")) - self.older_step(folder))
            shutil.rmtree(folder, ignore_errors=True)
            self.corrupted.discard(folder)
            return
        if self.ballast.exists():
            self.ballast.unlink()
            self.say(f"job {self.jid} ended {final}; freed the disk (removed the ballast)")
            return
        self.say(f"job {self.jid} ended {final}; resubmitting into the same job folder")

    def older_step(self, folder: Path) -> int:
        older = [int(p.name.removeprefix("step_")) for p in checkpoints(self.run_dir) if p.name < folder.name]
        return max(older, default=0)

    # ---- faults
    def inject(self, fault: Fault) -> None:
        fault.at_s = time.time() - self.t0
        fault.attempt = self.attempts()
        self.hit_step = heartbeat_step(self.job_dir, self.jid)
        self.struck_run = max(runs_alive(self.jid), key=int, default="0")
        getattr(self, f"inject_{fault.kind}")(fault)
        self.say(f"fault {fault.index}: {fault.kind} -> {fault.target} (job {self.jid}, step ~{self.hit_step}, "
                 f"latest checkpoint {latest_step(self.run_dir)})")

    def pick_rank(self, fault: Fault) -> tuple[int, int, str]:
        ranks = rank_pids(self.jid)
        rank = sorted(ranks)[fault.pick % len(ranks)]
        return rank, *ranks[rank]

    def inject_kill_rank(self, fault: Fault) -> None:
        rank, pid, node = self.pick_rank(fault)
        os.kill(pid, signal.SIGKILL)
        fault.target = f"rank {rank} (pid {pid} on {node})"

    def inject_stop_rank(self, fault: Fault) -> None:
        rank, pid, node = self.pick_rank(fault)
        os.kill(pid, signal.SIGSTOP)
        fault.target = f"rank {rank} (pid {pid} on {node})"
        fault.checks.append(f"watchdog names rank {rank} (pid {pid} on {node})")
        self.stopped = (rank, pid, node)

    def inject_term_batch(self, fault: Fault) -> None:
        self.cluster.slurm("scancel", "--batch", "--signal=TERM", self.jid)
        fault.target = f"batch step of job {self.jid}"

    def inject_preempt(self, fault: Fault) -> None:
        self.cluster.slurm("scancel", "--signal=USR2", self.jid)
        fault.target = f"job {self.jid}"

    def inject_preempt_in_save(self, fault: Fault) -> None:
        pids = [pid for pid, _ in rank_pids(self.jid).values()]
        saving = self.wait_for_a_save(pids)
        still = saving and (self.run_dir / "checkpoints" / saving).exists()
        fault.target = (f"job {self.jid} while writing {saving}" + (" (still being written after the signal)"
                                                                   if still else "")
                        if saving else f"job {self.jid} (three saves too quick to catch; after the third)")

    def job_nodes(self) -> list[str]:
        return sorted({node for _, node in rank_pids(self.jid).values()})

    def inject_lose_node(self, fault: Fault) -> None:
        nodes = self.job_nodes()
        node = nodes[fault.pick % len(nodes)]
        # Every other lost node stays down while the job goes on: on the node that is left,
        # with half the ranks, resuming the checkpoint of the full layout.
        self.shrink = len(nodes) == 2 and self.nodes_lost % 2 == 0
        self.nodes_lost += 1
        pids = subprocess.run(["ip", "netns", "pids", self.cluster.netns(node)], capture_output=True, text=True,
                              timeout=30).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        fault.target = f"{node} ({len(pids)} processes: slurmd, slurmstepd, tasks)"
        self.lost = node

    def inject_disk_full(self, fault: Fault) -> None:
        latest = checkpoints(self.run_dir)[-1]
        size = sum(p.stat().st_size for p in latest.iterdir())
        room = size // 3 + fault.pick % (size // 3)  # less than the next checkpoint needs
        free = shutil.disk_usage(self.fs).free
        with open(self.ballast, "wb") as f:
            f.truncate(0)
            f.write(bytes(max(0, free - room)))
        fault.target = f"run file system ({room // 1000} kB left, a checkpoint needs {size // 1000} kB)"
        fault.checks.append("one-line 'no space left on device writing step' error")

    def inject_net_cut(self, fault: Fault) -> None:
        nodes = self.job_nodes()
        node = nodes[fault.pick % len(nodes)]
        cut_s = self.cfg.hang_timeout_s + 5 + fault.pick % 10
        veth = self.cluster.veth(node)
        subprocess.run(["ip", "link", "set", veth, "down"], check=True, timeout=30)
        fault.target = f"{node}'s link {veth} down for {cut_s:g} s"
        self.cut = (veth, time.time() + cut_s)

    def corrupt(self, fault: Fault) -> None:
        """Flip one byte of the latest checkpoint while no run of the job is running: the
        job held if it waits for its requeue, the next submission otherwise."""
        fault.at_s = time.time() - self.t0
        fault.attempt = self.attempts()
        held = self.cluster.queued_state(self.jid) is not None
        if held:
            try:
                self.cluster.slurm("scontrol", "hold", self.jid)
            except ChaosError as e:  # it left squeue since (COMPLETING a moment ago): nothing to hold
                if "already finished" not in str(e):
                    raise
                held = False
        try:
            found = checkpoints(self.run_dir)
            if not found:
                fault.target = "nothing: no checkpoint published yet"
                fault.recovered_s = fault.at_s
                return
            folder = found[-1]
            files = sorted(folder.glob("__*.distcp"))
            file = files[fault.pick % len(files)]
            offset = fault.pick % file.stat().st_size
            with open(file, "r+b") as f:
                f.seek(offset)
                byte = f.read(1)[0]
                f.seek(offset)
                f.write(bytes([byte ^ 0xFF]))
            self.corrupted.add(folder)
            fault.target = f"{file.relative_to(self.job_dir)} byte {offset}"
            fault.checks.append(f"one-line checksum error naming {file.name} of {folder.name}")
            self.say(f"fault {fault.index}: corrupt_ckpt -> {fault.target} (between attempts of job {self.jid})")
            self.corrupt_fault = fault
        finally:
            if held:
                self.cluster.slurm("scontrol", "release", self.jid)

    # ---- recovery
    def wait_attempt_end(self, fault: Fault) -> None:
        """Wait until the attempt the fault hit is over (SLURM holds its tasks no more), then
        undo what outlives it (a cut link, a lost node) and check what the kind must show."""
        jid, bound = self.jid, self.cfg.hang_timeout_s + 120
        if fault.kind == "lose_node":
            bound = 180.0
        struck, run = time.time(), self.struck_run
        node_fails = self.cluster.runs(jid).count("NODE_FAIL")
        while True:
            if fault.kind == "net_cut" and self.cut and time.time() >= self.cut[1]:
                subprocess.run(["ip", "link", "set", self.cut[0], "up"], check=True, timeout=30)
                self.say(f"fault {fault.index}: link {self.cut[0]} up again")
                self.cut = None
            tasks = rank_pids(jid, run)
            state = self.cluster.queued_state(jid)
            # over once the struck run's tasks are gone and SLURM runs none of it, or runs the next one
            over = not tasks and (state != "RUNNING" or bool(runs_alive(jid) - {run}))
            if fault.kind == "lose_node" and over and state is not None:
                # the node comes back once SLURM has given up on it (SlurmdTimeout=30 s)
                over = self.cluster.runs(jid).count("NODE_FAIL") > node_fails or time.time() - struck > 45
            if over and not (fault.kind == "net_cut" and self.cut):
                break
            if time.time() - struck > bound:
                fault.checks.append(f"attempt over within {bound:g} s")
                self.say(f"fault {fault.index}: the attempt is not over after {bound:g} s (SLURM: {state}; "
                         f"its tasks: {describe(tasks)}); killing them")
                for pid, _ in tasks.values():  # keys are ranks: os.kill(0) would end this process group
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                if fault.kind == "net_cut" and self.cut:
                    subprocess.run(["ip", "link", "set", self.cut[0], "up"], timeout=30)
                    self.cut = None
                break
            time.sleep(0.5)
        if fault.kind == "lose_node":
            runs = self.cluster.runs(jid)
            seen = ("SLURM ended the run NODE_FAIL" if runs.count("NODE_FAIL") > node_fails else
                    f"the job {self.cluster.queued_state(jid) or 'ended ' + runs[-1]}")
            if self.shrink:
                self.go_on_without(fault, jid)
            self.cluster.restore_node()
            self.say(f"fault {fault.index}: {self.lost} restored ({seen})")
        self.recomputed += max(0, heartbeat_step(self.job_dir, jid) - latest_step(self.run_dir))
        fault.recovered_s = time.time() - self.t0
        logs = logs_of(self.job_dir, jid)
        if fault.kind == "stop_rank":
            rank, pid, node = self.stopped
            if re.search(rf"no step completed for .*rank {rank} \(pid {pid} on {node}\) is silent", logs):
                fault.checks.pop()
            with contextlib.suppress(ProcessLookupError):  # must be gone already; checked at the end
                os.kill(pid, signal.SIGCONT)
        if fault.kind == "disk_full" and re.search(r"no space left on device writing step \d+ to ", logs):
            fault.checks.pop()
        self.say(f"fault {fault.index}: attempt over {fault.recovered_s - fault.at_s:.0f} s after the fault"
                 + (f"; failed checks: {fault.checks}" if fault.checks else ""))

    def go_on_without(self, fault: Fault, jid: str) -> None:
        """What a user does when a lost node will not be back soon: cancel the requeued job
        (it waits for two nodes) and submit it on the node that is left. It resumes the last
        checkpoint of the full layout with half the ranks (a resharding resume)."""
        self.cluster.slurm("scancel", jid, check=False)
        deadline = time.time() + 120
        while self.cluster.queued_state(jid) is not None:
            if time.time() > deadline:
                raise ChaosError(f"job {jid} still queued 120 s after scancel")
            time.sleep(0.5)
        self.say(f"fault {fault.index}: {self.lost} stays down; job {jid} cancelled and submitted on the node "
                 f"that is left ({TASKS_PER_NODE} ranks instead of {2 * TASKS_PER_NODE})")
        self.submit(nodes=1)
        while not (self.cluster.queued_state(self.jid) == "RUNNING" and rank_pids(self.jid)):
            if time.time() > deadline + 120:
                raise ChaosError(f"job {self.jid} did not start on the node that is left within 240 s")
            time.sleep(0.5)

    # ---- the end
    def final_checks(self, reference: Path) -> bool:
        for fault in self.faults:
            if fault.kind == "corrupt_ckpt" and fault.checks:
                folder_name = re.search(r"of (step_\d{8})", fault.checks[0])[1]
                file_name = fault.checks[0].split()[-3]
                if re.search(rf"{folder_name}/{file_name} does not match the checksum", self.all_logs()):
                    fault.checks.clear()
                elif all(p.name != folder_name for p in checkpoints(self.run_dir)):
                    fault.checks.clear()  # pruned before any run loaded it: never loaded silently
                fault.recovered_s = fault.recovered_s or time.time() - self.t0
        final = self.cfg.steps
        segments = self.layouts()
        same_as = reference
        if len(segments) > 1:  # a world-size change: against an undisturbed run with the same changes
            self.say("layout of the final run: " + ", ".join(f"{n * TASKS_PER_NODE} ranks to step {last}"
                                                            for last, n in segments))
            self.undisturbed(self.fs / "reference_layout", segments)
            same_as = self.fs / "reference_layout" / "run"
        differ = same_checkpoint(same_as / "checkpoints" / f"step_{final:08d}",
                                 self.run_dir / "checkpoints" / f"step_{final:08d}")
        if differ:
            self.problems.append(f"final checkpoint differs from the reference in {', '.join(differ)}")
        bad = bad_checksums(self.run_dir, self.corrupted)
        self.problems += [f"published checkpoint fails its checksum: {b}" for b in bad]
        ours, theirs = tensorboard_steps(self.run_dir), tensorboard_steps(reference)
        for tag in sorted(set(ours) | set(theirs)):
            steps = ours.get(tag, [])
            if len(steps) != len(set(steps)):
                self.problems.append(f"TensorBoard {tag}: steps logged twice: "
                                     f"{sorted({s for s in steps if steps.count(s) > 1})}")
            if sorted(set(steps)) != sorted(set(theirs.get(tag, []))):
                missing = sorted(set(theirs.get(tag, [])) - set(steps))
                self.problems.append(f"TensorBoard {tag}: steps missing {missing[:10]}, extra "
                                     f"{sorted(set(steps) - set(theirs.get(tag, [])))[:10]}")
        return not differ

    def all_logs(self) -> str:
        return "\n".join(logs_of(self.job_dir, jid) for jid in self.jids)

    def leftover_processes(self) -> None:
        deadline = time.time() + 60
        while job_processes(set(self.jids)) and time.time() < deadline:
            time.sleep(1)
        left = job_processes(set(self.jids))
        if left:
            self.problems.append(f"processes of the jobs left behind: {sorted(left)}")
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        queued = [j for j in self.jids if self.cluster.queued_state(j)]
        if queued:
            self.problems.append(f"SLURM jobs left queued: {queued}")

    def leftovers_after_stop(self, before: set[str]) -> None:
        left = network_objects() - before
        if left:
            self.problems.append(f"network objects left behind: {sorted(left)}")
        if str(self.fs) in Path("/proc/mounts").read_text():
            self.problems.append(f"mount left behind: {self.fs}")
            subprocess.run(["umount", "-l", str(self.fs)], capture_output=True, timeout=60)
        if not self.cfg.keep:
            shutil.rmtree(self.cfg.workdir, ignore_errors=True)

    def report(self, equal: bool, lost_s: float) -> int:
        injected = [f for f in self.faults if f.at_s is not None]
        survived = [f for f in injected if f.survived]
        lines = ["", "fault  kind             at (s)  attempt  survived  target"]
        for f in injected:
            lines.append(f"{f.index:>5}  {f.kind:<15}  {f.at_s:>6.0f}  {f.attempt:>7}  "
                         f"{'yes' if f.survived else 'NO':>8}  {f.target}"
                         + (f"  [failed: {'; '.join(f.checks)}]" if f.checks else ""))
        lines += ["", "kind             injected  survived"]
        for kind in KINDS:
            n = sum(f.kind == kind for f in injected)
            if n:
                lines.append(f"{kind:<15}  {n:>8}  {sum(f.kind == kind for f in survived):>8}")
        attempts = self.attempt_count
        lines += ["", f"attempts: {attempts}   steps recomputed: {self.recomputed}   seconds lost against the "
                      f"undisturbed run: {lost_s:.0f}"]
        lines += [f"problem: {problem}" for problem in self.problems]
        ok = equal and not self.problems and len(survived) == len(injected) == self.cfg.faults
        last = (f"chaos: {len(injected)} faults injected, {len(survived)} survived, {attempts} attempts, "
                f"{self.recomputed} steps recomputed, final state equal: {'yes' if equal else 'no'}")
        print("\n".join(lines))
        if self.cfg.record:
            from results import write_results

            table = "\n".join(["```", *lines[1:], last, "```", "", "The harness's log:", "", "```", *self.said, "```"])
            print(f"results: {write_results('chaos', table)}")
        print(last)
        return 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> ChaosConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", type=int, required=True, help="number of faults to inject")
    p.add_argument("--seed", type=int, required=True, help="draws the faults; the same seed replays them")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help=f"comma-separated kinds to draw from (default: all of {','.join(KINDS)})")
    p.add_argument("--steps", type=int, help="training steps (default: room for every fault)")
    p.add_argument("--ckpt-every", type=int, default=5, help="checkpoint cadence in steps (default 5)")
    p.add_argument("--hang-timeout", type=float, default=30, help="train.hang_timeout_s of the job (default 30)")
    p.add_argument("--max-attempts", type=int, help="bound on runs of the job (default 2 x faults + 3)")
    p.add_argument("--time-limit", type=float, help="bound on the chaos job in seconds (default 300 + 150 x faults)")
    p.add_argument("--workdir", type=Path, help="work folder (default: a new one under the temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder afterwards")
    p.add_argument("--reference", type=Path, help="reuse this reference job folder (from an earlier --keep)")
    p.add_argument("--record", action="store_true", help="write the table and the log to results/chaos.md")
    a = p.parse_args(argv)
    kinds = tuple(k for k in a.kinds.split(",") if k)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        p.error(f"--kinds: unknown {', '.join(unknown) or '(none given)'}; choose from {','.join(KINDS)}")
    if a.faults < 1:
        p.error(f"--faults {a.faults}: give at least 1")
    if os.geteuid() != 0:
        p.error("the local SLURM cluster, the tmpfs and the network cut need root; run as root")
    # Each fault waits for a checkpoint newer than the last fault's and may cost one (a corrupted
    # checkpoint is deleted, so the run goes back one): two cadences per fault, four to spare.
    steps = a.steps or a.ckpt_every * (2 * a.faults + 4)
    if a.workdir and a.workdir.exists() and any(a.workdir.iterdir()):
        p.error(f"--workdir {a.workdir} is not empty (the harness deletes its work folder): give a new folder")
    workdir = (a.workdir or Path(tempfile.mkdtemp(prefix="vsgd-chaos-", dir="/tmp"))).resolve()
    if len(str(workdir / SLURMD_SOCKET)) > SOCKET_PATH_MAX:
        p.error(f"--workdir {workdir} is too long for slurmstepd's sockets under it "
                f"({SOCKET_PATH_MAX} bytes at most); pick a shorter one, e.g. under /tmp")
    return ChaosConfig(faults=a.faults, seed=a.seed, kinds=kinds, steps=steps, ckpt_every=a.ckpt_every,
                       hang_timeout_s=a.hang_timeout, max_attempts=a.max_attempts or 2 * a.faults + 3,
                       time_limit_s=a.time_limit or 300 + 150 * a.faults,
                       workdir=workdir,
                       keep=a.keep, reference=a.reference.resolve() if a.reference else None, record=a.record)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO))

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"{signal.Signals(signum).name} received")

    signal.signal(signal.SIGTERM, interrupt)  # clean up (jobs, cluster, tmpfs) as on Ctrl-C
    return Chaos(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
