"""Training across nodes on a real 3-node SLURM cluster on this machine.

The module fixture starts `slurm/local/start.sh --nodes 3` in its own folder, with its own
ports and address range (a cluster already running here is left alone), and stops it at
the end, checking that the namespaces, veths, bridge and daemons it made are gone. Each
node has its own network namespace, hostname and address, so ranks on different nodes
talk over a bridge as on separate machines. The demo recipe on SLURM is compared with
`launch run` on local processes at the same world size: same bits.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from launch.clusters import ClusterProfile, LaunchError, load_profile
from launch.job import check_master_addr
from launch.slurm import build_spec
from slurm_helpers import (REPO, Cluster, assert_same_checkpoint, assert_same_scalars, checkpoint_dir, job_id,
                           preempt_after, scalars, submit_demo, wait_for)

NODES = 3
CLUSTER_PORTS = {"SLURM_LOCAL_CTLD_PORT": "6837", "SLURM_LOCAL_SLURMD_PORT": "6838", "SLURM_LOCAL_DBD_PORT": "6839",
                 "SLURM_LOCAL_DB_PORT": "3327"}
DEMO = ["optimizer=vsgd", "max_steps=40", "train.global_batch=48", "train.ckpt_every=10", "train.log_every=5",
        "train.keep_checkpoints=4", "train.progress=false"]
"""The demo recipe, short; 48 images per step split evenly over 3 or 4 ranks."""
LOST_NODE_BOUND_S = 120
"""A lost node's job ends within this (SlurmdTimeout=30 s on the local multi-node cluster)."""


# --- fixtures and helpers -----------------------------------------------------------------
def network_objects() -> set[str]:
    ip = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=30).stdout
    links = {line.split(":")[1].strip().split("@")[0] for line in ip.splitlines()}
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return links | {f"netns {line.split()[0]}" for line in netns.splitlines() if line}


def free_net() -> str:
    """The first 10.213.X.0/24 (X >= 7) no interface here has an address in: another cluster
    (one a killed session left behind) keeps its range, and this one does not collide."""
    addrs = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, timeout=30).stdout
    used = set(re.findall(r"inet 10\.213\.(\d+)\.", addrs))
    return next(f"10.213.{x}.0/24" for x in range(7, 255) if str(x) not in used)


def created(cluster: Cluster) -> list[tuple[str, str]]:
    """(kind, name) of each network object start.sh recorded."""
    return [tuple(line.split()) for line in (cluster.folder / "net" / "created").read_text().splitlines()]


def daemon_pids(cluster: Cluster) -> list[int]:
    return [int(p.read_text()) for p in (cluster.folder / "pid").glob("*.pid")]


def running(pid: int) -> bool:
    """A zombie (its parent, PID 1, may reap it late) does not count."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    before = network_objects()
    cluster = Cluster.start(tmp_path_factory.mktemp("multinode") / "cluster", "--nodes", str(NODES),
                            env={**CLUSTER_PORTS, "SLURM_LOCAL_NET": free_net()})
    names = {name if kind != "netns" else f"netns {name}" for kind, name in created(cluster)}
    pids = daemon_pids(cluster)
    yield cluster
    stop = cluster.stop()
    assert stop.returncode == 0, stop.stderr
    after = network_objects()
    assert before <= after and not names & after, f"left behind: {names & after}"
    assert not [pid for pid in pids if running(pid)]


def launch_run(cluster: Cluster, out: Path, nproc: int) -> Path:
    """The demo on `nproc` local processes into `out` (resuming what `out` holds)."""
    res = cluster.launch("run", "recipes/demo.yaml", "--nproc", str(nproc), *DEMO, f"out={out}", timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def run_on_slurm(cluster: Cluster, out: Path, nodes: int, tasks: int) -> Path:
    jid = submit_demo(cluster, out, "--nodes", str(nodes), "--tasks-per-node", str(tasks), *DEMO)
    assert cluster.wait_done(jid, timeout=900) == {jid: "COMPLETED"}
    return out


def rank_hosts(job_dir: Path) -> list[str]:
    """The node each rank ran on (first attempt), from the rank logs."""
    jid = job_id(job_dir)
    logs = sorted(job_dir.glob(f"submitit/{jid}_*_log.out"), key=lambda p: int(p.name.split("_")[1]))
    return [re.search(r"^launch: rank \d+/\d+ on (\S+)", log.read_text(), re.M)[1] for log in logs]


def seeded(run_dir: Path, source: Path, step: int) -> Path:
    """A run folder holding only `source`'s recipe and its checkpoint of `step`."""
    shutil.copytree(checkpoint_dir(source, step), checkpoint_dir(run_dir, step))
    shutil.copy(source / "recipe.yaml", run_dir / "recipe.yaml")
    return run_dir


def first_steps(run_dir: Path) -> list[int]:
    """The first train/loss step of each TensorBoard file (one per attempt), oldest first."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    firsts = []
    for path in sorted((run_dir / "tb").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        steps = [e.step for e in EventFileLoader(str(path)).Load()
                 if any(v.tag == "train/loss" for v in e.summary.value)]
        firsts += steps[:1]
    return firsts


@contextmanager
def pinned(cluster: Cluster, node: str, cpu: int):
    """Pin `node`'s slurmd, and so every task it starts, to one CPU (as srun --cpu-bind would)."""
    tids = [int(t) for t in os.listdir(f"/proc/{(cluster.folder / 'pid' / f'slurmd-{node}.pid').read_text().strip()}/task")]
    cpus = os.sched_getaffinity(tids[0])
    for tid in tids:
        os.sched_setaffinity(tid, {cpu})
    try:
        yield
    finally:
        for tid in tids:
            os.sched_setaffinity(tid, cpus)


def lose_node(cluster: Cluster, node: str) -> None:
    """Crash `node`: SIGKILL every process in its network namespace (slurmd, slurmstepd, tasks)."""
    (netns,) = [name for kind, name in created(cluster) if kind == "netns" and name.endswith(f"-{node}")]
    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=30).stdout.split()
    assert pids, f"nothing runs on {node}"
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)


@pytest.fixture(scope="module")
def local4(cluster, tmp_path_factory) -> Path:
    return launch_run(cluster, tmp_path_factory.mktemp("local4") / "run", 4)


@pytest.fixture(scope="module")
def nodes2x2(cluster, tmp_path_factory) -> Path:
    """The reference multi-node job: 2 nodes x 2 tasks, uninterrupted."""
    return run_on_slurm(cluster, tmp_path_factory.mktemp("nodes2x2") / "job", nodes=2, tasks=2)


# --- the cluster --------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_cluster_has_nodes_with_own_names_and_addresses(cluster):
    names = sorted(cluster.slurm("srun", f"-N{NODES}", "hostname").split())
    assert names == [f"node{i}" for i in range(1, NODES + 1)]
    hosts = dict(line.split()[::-1] for line in (cluster.folder / "hosts").read_text().splitlines())
    prefix = cluster.env["SLURM_LOCAL_NET"].removesuffix("0/24")
    assert all(hosts[n].startswith(prefix) for n in names)  # never 127.x: gloo would listen on loopback
    kinds = [kind for kind, _ in created(cluster)]
    assert kinds.count("bridge") == 1 and kinds.count("netns") == kinds.count("veth") == NODES
    again = subprocess.run(["bash", "slurm/local/start.sh", "--nodes", str(NODES), str(cluster.folder)],
                           env=cluster.env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already running" in again.stdout
    other = subprocess.run(["bash", "slurm/local/start.sh", "--nodes", "2", str(cluster.folder)], env=cluster.env,
                           capture_output=True, text=True, timeout=60)
    assert other.returncode == 1 and f"a {NODES}-node cluster runs under" in other.stderr


@pytest.mark.timeout(120)
def test_more_nodes_than_the_cluster_has_fail_before_submission(cluster, tmp_path):
    res = cluster.launch("submit", "recipes/demo.yaml", "--cluster", "local", "--nodes", str(NODES + 1),
                         "--out", str(tmp_path / "job"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert f"--nodes {NODES + 1}: cluster profile 'local' allows 1 to {NODES}" in res.stderr
    assert not (tmp_path / "job").exists()


# --- multi-node runs equal local runs -----------------------------------------------------
@pytest.mark.timeout(1800)
def test_two_nodes_by_two_tasks_equal_four_local_processes(nodes2x2, local4):
    hosts = rank_hosts(nodes2x2)
    assert len(hosts) == 4 and hosts[0] == hosts[1] != hosts[2] == hosts[3], hosts
    for step in (10, 40):
        assert_same_checkpoint(local4, nodes2x2 / "run", step)
    assert_same_scalars(local4, nodes2x2 / "run")


@pytest.mark.timeout(1800)
def test_three_nodes_by_one_task_equal_three_local_processes_with_a_task_pinned(cluster, tmp_path):
    """Node 3's task is pinned to one CPU, as srun --cpu-bind pins tasks on real clusters."""
    with pinned(cluster, "node3", cpu=0):
        probe = cluster.slurm("srun", "-w", "node3", "grep", "Cpus_allowed_list", "/proc/self/status")
        assert probe.split()[-1] == "0"
        job = run_on_slurm(cluster, tmp_path / "job", nodes=3, tasks=1)
    assert len(set(rank_hosts(job))) == 3
    local3 = launch_run(cluster, tmp_path / "local3", 3)
    assert_same_checkpoint(local3, job / "run", 40)
    assert_same_scalars(local3, job / "run")


@pytest.mark.timeout(1800)
def test_usr2_requeue_of_a_two_node_job_resumes_bitwise(cluster, nodes2x2, tmp_path):
    out = tmp_path / "job"
    jid = submit_demo(cluster, out, "--nodes", "2", "--tasks-per-node", "2", *DEMO)
    preempt_after(cluster, out, step=10)
    assert cluster.wait_done(jid, timeout=900) == {jid: "COMPLETED"}
    assert cluster.attempts(jid) == ["REQUEUED", "COMPLETED"]
    (event,) = json.loads((out / "interruptions.json").read_text())
    assert event["kind"] == "preemption" and 10 <= event["step"] < 40
    assert_same_checkpoint(nodes2x2 / "run", out / "run", 40)
    assert_same_scalars(nodes2x2 / "run", out / "run", resumed_at=event["step"], log_every=5)


@pytest.mark.timeout(1800)
def test_a_two_by_two_checkpoint_resumes_on_three_nodes_by_one(cluster, nodes2x2, tmp_path):
    """Resharding across node counts: 4 ranks' step-20 checkpoint continues on 3 nodes, bit
    for bit as 3 local processes continue it."""
    job = tmp_path / "job"
    seeded(job / "run", nodes2x2 / "run", 20)
    run_on_slurm(cluster, job, nodes=3, tasks=1)
    local3 = launch_run(cluster, seeded(tmp_path / "local3", nodes2x2 / "run", 20), 3)
    assert first_steps(job / "run") == [25]
    assert_same_checkpoint(local3, job / "run", 40)
    assert_same_scalars(local3, job / "run")


def node_layout_run(rank: int, world_size: int, out: str) -> dict:
    """One rank of the demo with engine.shard_within=node, as `launch run` would start it;
    `run_distributed(..., ranks_per_node=2)` numbers the ranks as 2 nodes of 2, as SLURM does."""
    import launch  # noqa: F401 - what every run imports first: it sets NUMBA_THREADING_LAYER
    from vsgd_dist.config import load_recipe
    from vsgd_dist.train.trainer import Trainer

    cfg = load_recipe(str(REPO / "recipes/demo.yaml"), [*DEMO, "engine.shard_within=node", f"out={out}"],
                      world_size=4)
    return Trainer(cfg.to_dict()).run()


@pytest.mark.timeout(1200)
def test_a_job_stopped_at_a_step_completes_and_the_next_resumes_on_one_node(cluster, nodes2x2, tmp_path):
    """train.stop_at under SLURM ends the job COMPLETED with the checkpoint of that step (not
    a failed wait for a requeue), and the job that continues it with half the ranks, on the
    one node left, ends as 2 local processes continuing the same checkpoint end."""
    job = tmp_path / "job"
    jid = submit_demo(cluster, job, "--nodes", "2", "--tasks-per-node", "2", *DEMO, "train.stop_at=20")
    assert cluster.wait_done(jid, timeout=900) == {jid: "COMPLETED"}
    assert_same_checkpoint(nodes2x2 / "run", job / "run", 20)
    run_on_slurm(cluster, job, nodes=1, tasks=2)
    local2 = launch_run(cluster, seeded(tmp_path / "local2", nodes2x2 / "run", 20), 2)
    assert first_steps(job / "run")[-1] == 25
    assert_same_checkpoint(local2, job / "run", 40)


@pytest.mark.timeout(1800)
def test_shard_within_node_on_two_nodes_resumes_the_world_checkpoint_as_local_nodes_do(cluster, nodes2x2, tmp_path):
    """engine.shard_within=node on 2 nodes x 2 tasks resumes the world layout's step-20
    checkpoint (resharding world -> node across nodes): every rank holds half the optimizer
    state (world: a quarter), only node 1's ranks write shards, and steps 21-40 are bit for bit
    those of 4 local processes numbered as the same 2 nodes x 2 (the same summation order).
    Node against world is a tolerance, proven on exactly summable gradients in
    test_shard_within.py; here 20 steps would amplify the changed order by a
    machine-dependent amount, so the two layouts are not compared after training."""
    from vsgd_dist.spawn import run_distributed
    from vsgd_dist.train.checkpoint import read_meta
    from test_shard_within import shard_writers

    job = tmp_path / "job"
    seeded(job / "run", nodes2x2 / "run", 20)
    jid = submit_demo(cluster, job, "--nodes", "2", "--tasks-per-node", "2", *DEMO, "engine.shard_within=node")
    assert cluster.wait_done(jid, timeout=900) == {jid: "COMPLETED"}
    local = seeded(tmp_path / "local_nodes", nodes2x2 / "run", 20)
    run_distributed(node_layout_run, 4, str(local), timeout=900, ranks_per_node=2)
    assert first_steps(job / "run") == first_steps(local) == [25]
    meta, world_meta = (read_meta(checkpoint_dir(run, 40)) for run in (job / "run", nodes2x2 / "run"))
    assert [2 * b for b in meta["state_bytes_per_rank"]] == pytest.approx(
        [4 * b for b in world_meta["state_bytes_per_rank"]], rel=1e-3)  # up to each split's bucket padding
    assert shard_writers(checkpoint_dir(job / "run", 40)) == {0, 1}
    assert_same_checkpoint(local, job / "run", 40)
    assert_same_scalars(local, job / "run")


@pytest.mark.timeout(1800)
def test_a_lost_node_ends_the_run_and_the_requeued_job_resumes(cluster, nodes2x2, tmp_path):
    """Node 2 of a running 2-node job crashes (slurmd, slurmstepd and tasks killed): the
    survivors fail at once (gloo: connection closed by the lost peer), SLURM marks the node
    down within SlurmdTimeout, ends that run NODE_FAIL and requeues the job onto the nodes
    left, which resumes from the last checkpoint and ends as if never interrupted."""
    out = tmp_path / "job"
    jid = submit_demo(cluster, out, "--nodes", "2", "--tasks-per-node", "2", *DEMO)
    wait_for(checkpoint_dir(out / "run", 10).is_dir, "the checkpoint of step 10", timeout=600)
    lost = rank_hosts(out)[-1]
    lose_node(cluster, lost)
    lost_at = time.time()
    try:
        wait_for(lambda: cluster.attempts(jid)[:1] == ["NODE_FAIL"], "NODE_FAIL", timeout=LOST_NODE_BOUND_S)
        print(f"job {jid}: NODE_FAIL {time.time() - lost_at:.0f} s after {lost} was lost")
        assert cluster.wait_done(jid, timeout=900) == {jid: "COMPLETED"}
    finally:
        Cluster.start(cluster.folder, "--nodes", str(NODES), env=cluster.env)  # brings the node back
    assert cluster.attempts(jid) == ["NODE_FAIL", "COMPLETED"]
    status = cluster.launch("status", str(out))
    assert re.search(rf"^{jid}\s.*COMPLETED.*\s1\s*$", status.stdout, re.M), status.stdout  # 1 requeue
    resumed = first_steps(out / "run")[-1]
    assert resumed in (15, 25), resumed  # from the checkpoint of step 10 (or 20), not from scratch
    assert_same_checkpoint(nodes2x2 / "run", out / "run", 40)
    assert_same_scalars(nodes2x2 / "run", out / "run")


@pytest.mark.timeout(300)
def test_a_run_lock_of_another_node_is_taken_over_once_squeue_no_longer_runs_its_job(cluster, nodes2x2, tmp_path,
                                                                                      monkeypatch):
    """A job that lost a node, cancelled and submitted again on the nodes left, finds the old
    job's lock on the run folder with a fresh heartbeat (the lost node touched it seconds ago):
    it takes the lock over once squeue no longer runs the old job, and not while it does."""
    from test_faults import write_lock
    from vsgd_dist.train.run_lock import RunLock, RunLocked

    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    sleeper = cluster.slurm("sbatch", "--parsable", "-N", "1", "-n", "1", "-o", "/dev/null", "--wrap", "sleep 240")
    sleeper = sleeper.strip().split(";")[0]
    cluster.submitted.append(sleeper)
    try:
        wait_for(lambda: cluster.slurm("squeue", "-h", "-j", sleeper, "-o", "%T").strip() == "RUNNING",
                 f"job {sleeper} running", timeout=120)
        write_lock(tmp_path, age_s=5, job_id=sleeper)
        with pytest.raises(RunLocked, match=f"in use by pid 1 on node7, SLURM job {sleeper} "):
            RunLock(tmp_path).__enter__()
    finally:
        cluster.slurm("scancel", sleeper)
    wait_for(lambda: not cluster.slurm("squeue", "-h", "-j", sleeper, "-o", "%T").strip(), "scancel", timeout=60)
    for ended in (job_id(nodes2x2), "999999"):  # completed; never submitted (squeue: invalid job id)
        write_lock(tmp_path, age_s=5, job_id=ended)
        with RunLock(tmp_path):
            assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()


# --- no cluster needed --------------------------------------------------------------------
PINNED_RUN = """
import sys, threading
import launch  # what every run imports first: it sets NUMBA_THREADING_LAYER
from vsgd_dist.config import load_recipe
from vsgd_dist.train.trainer import Trainer
cfg = load_recipe("recipes/demo.yaml", ["max_steps=2", "train.progress=false", f"out={sys.argv[1]}"], world_size=1)
trainer = threading.Thread(target=Trainer(cfg.to_dict()).run, daemon=True)  # as in launch.job
trainer.start()
trainer.join()
"""


@pytest.mark.timeout(600)
def test_a_process_pinned_to_one_cpu_exits_after_training(tmp_path):
    """With numba's TBB layer (OpenCV brings libtbb) this process hangs at exit; with OpenMP,
    which the launch package selects, it ends."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    res = subprocess.run([sys.executable, "-c", PINNED_RUN, str(tmp_path / "run")], cwd=REPO, env=env,
                         preexec_fn=lambda: os.sched_setaffinity(0, {0}), capture_output=True, text=True,
                         timeout=500)
    assert res.returncode == 0, res.stderr[-2000:]
    assert checkpoint_dir(tmp_path / "run", 2).is_dir()


@pytest.mark.timeout(30)
def test_master_addr_on_loopback_fails_a_multi_node_job_at_start():
    for addr in ("localhost", "127.0.0.1"):
        with pytest.raises(SystemExit, match=f"MASTER_ADDR {addr} resolves to the loopback address 127.0.0.1 on .*"
                                             "but the job spans 2 nodes"):
            check_master_addr(addr, num_nodes=2)
    check_master_addr("localhost", num_nodes=1)
    check_master_addr("10.213.0.11", num_nodes=2)
    with pytest.raises(SystemExit, match="MASTER_ADDR no-such-node.invalid does not resolve"):
        check_master_addr("no-such-node.invalid", num_nodes=2)


@pytest.mark.timeout(30)
def test_network_interface_is_exported_to_every_task(tmp_path):
    profile = ClusterProfile(name="site", gpus_per_node=8, cpus_per_node=96, max_nodes=4, max_tasks_per_node=8,
                             network_interface="ib0")
    args = argparse.Namespace(nodes=2, gpus_per_node=None, tasks_per_node=None, time="60", partition=None,
                              account=None, qos=None)
    assert "export GLOO_SOCKET_IFNAME=ib0 NCCL_SOCKET_IFNAME=ib0" in build_spec(profile, args, "job").setup
    (tmp_path / "bad.yaml").write_text("network_interface: 'ib0; rm -rf /'\n")
    with pytest.raises(LaunchError, match="network_interface 'ib0; rm -rf /' is not an interface name"):
        load_profile("bad", tmp_path)
