"""`launch submit|sweep|status|tail|cancel` against a real one-machine SLURM cluster.

The session fixture starts slurm/local/start.sh in the local cluster folder (VSGD_SLURM_LOCAL,
default .slurm-local; root only; it installs the Debian packages on a fresh machine) and
stops the cluster at the end if it started it. Jobs run tests/toy_trainer.py on 2 gloo ranks.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch.clusters import LaunchError, load_profile, parse_time
from launch.slurm import LOCAL_DIR
from slurm_helpers import (REPO, Cluster, assert_same_checkpoint, assert_same_scalars, job_id, preempt_after,
                           submit_demo, wait_for_line)

TOY = "tests.toy_trainer:ToyTrainer"


# --- fixtures and helpers -----------------------------------------------------------------
@pytest.fixture(scope="session")
def cluster(request) -> Cluster:
    """The one-node local cluster (left running if it was running before the tests)."""
    cluster = Cluster.start(LOCAL_DIR)
    if cluster.started_here:  # at exit, outside the timeout of whichever test happens to run last
        request.config.add_cleanup(cluster.stop)
    return cluster


def write_recipe(path: Path, **values) -> Path:
    path.write_text(yaml.safe_dump({"max_steps": 40, "step_sleep_s": 0.1, "seed": 0, "lr": 0.01, **values}))
    return path


def submit(cluster: Cluster, recipe: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    res = cluster.launch("submit", str(recipe), "--cluster", "local", "--tasks-per-node", "2", "--out", str(out),
                         "--trainer", TOY, *extra)
    assert res.returncode == 0, res.stderr
    return res


@pytest.fixture(scope="module")
def completed_run(cluster, tmp_path_factory):
    """An uninterrupted 2-task run: the reference for the requeue test."""
    tmp = tmp_path_factory.mktemp("completed")
    out = tmp / "job"
    res = submit(cluster, write_recipe(tmp / "toy.yaml"), out)
    return out, res.stdout, cluster.wait_done(job_id(out), timeout=90)


# --- the real cluster ---------------------------------------------------------------------
def one_line_error(res: subprocess.CompletedProcess, code: int = 2) -> str:
    """The command failed with `code` and said so in exactly one line (no traceback)."""
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.timeout(300)
def test_cancel_of_an_unknown_or_ended_job_says_so(cluster, tmp_path):
    err = one_line_error(cluster.launch("cancel", "99999"))
    assert "job 99999 is not queued or running (SLURM knows no such job: check the id, or --cluster)" in err, err
    (tmp_path / "toy.yaml").write_text("max_steps: 2\n")
    res = cluster.launch("submit", tmp_path / "toy.yaml", "--cluster", "local", "--out", tmp_path / "job",
                         "--trainer", "tests.toy_trainer:ToyTrainer")
    assert res.returncode == 0, res.stderr
    jid = job_id(tmp_path / "job")
    assert cluster.wait_done(jid, timeout=120) == {jid: "COMPLETED"}
    err = one_line_error(cluster.launch("cancel", tmp_path / "job"))
    assert f"job {jid} is not queued or running (it ended COMPLETED); nothing cancelled" in err, err


@pytest.mark.timeout(120)
def test_submit_runs_two_ranks_to_completion(cluster, completed_run):
    out, stdout, final = completed_run
    jid = job_id(out)
    assert final == {jid: "COMPLETED"}
    assert f"submitted job {jid}" in stdout and "tensorboard --logdir" in stdout
    assert (out / "recipe.yaml").is_file() and "#SBATCH" in (out / "sbatch.sh").read_text()
    assert (out / "run" / "final.pt").is_file()
    for rank in (0, 1):
        log = (out / "submitit" / f"{jid}_{rank}_log.out").read_text()
        assert f"launch: rank {rank}/2" in log and "'status': 'completed', 'step': 40" in log
    status = cluster.launch("status", str(out))
    assert status.returncode == 0 and re.search(rf"^{jid}\s.*COMPLETED.*\s0\s*$", status.stdout, re.M)


@pytest.mark.timeout(120)
def test_a_completed_task_exits_cleanly_whatever_its_teardown_would_do(cluster, tmp_path):
    out = tmp_path / "job"
    submit(cluster, write_recipe(tmp_path / "toy.yaml", max_steps=5, abort_at_exit=True), out)
    jid = job_id(out)
    assert cluster.wait_done(jid, timeout=90) == {jid: "COMPLETED"}
    assert cluster.slurm("sacct", "-n", "-X", "-j", jid, "-o", "ExitCode").split() == ["0:0"]


@pytest.mark.timeout(150)
def test_usr2_requeues_and_resumes_bitwise(cluster, completed_run, tmp_path):
    import torch

    out = tmp_path / "job"
    # With a 20 min limit an early USR2 is a preemption for submitit (a timeout under ~12 min).
    submit(cluster, write_recipe(tmp_path / "toy.yaml"), out, "--time", "20")
    jid = job_id(out)
    wait_for_line(f"{jid}_0_log.out", out / "submitit", r"^toy: step 10 ", timeout=60)
    cluster.slurm("scancel", "--signal=USR2", jid)
    assert cluster.wait_done(jid, timeout=100) == {jid: "COMPLETED"}

    runs = cluster.attempts(jid)
    assert runs == ["REQUEUED", "COMPLETED"]
    (event,) = json.loads((out / "interruptions.json").read_text())
    assert event["kind"] == "preemption" and 10 <= event["step"] < 40
    assert f"toy: resumed at step {event['step']}" in (out / "submitit" / f"{jid}_0_log.out").read_text()
    reference = torch.load(completed_run[0] / "run" / "final.pt")
    resumed = torch.load(out / "run" / "final.pt")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    status = cluster.launch("status", jid)  # a bare id finds its folder through the job comment
    assert re.search(rf"^{jid}\s.*COMPLETED.*\s1\s*$", status.stdout, re.M), status.stdout
    assert f"{event['kind']} at step {event['step']}" in status.stdout


@pytest.mark.timeout(120)
def test_sweep_is_one_job_array(cluster, tmp_path):
    recipe = write_recipe(tmp_path / "toy.yaml", max_steps=10, step_sleep_s=0.05)
    res = cluster.launch("sweep", str(recipe), "--cluster", "local", "--out", str(tmp_path / "sweep"),
                         "--trainer", TOY, "seed=0,1,2", "lr=0.02")
    assert res.returncode == 0, res.stderr
    jid = job_id(tmp_path / "sweep")
    assert cluster.wait_done(jid, timeout=100) == {f"{jid}_{i}": "COMPLETED" for i in range(3)}
    assert "python -m launch compare" in res.stdout.splitlines()[-1]
    for seed in range(3):
        point = tmp_path / "sweep" / f"seed={seed}"
        assert yaml.safe_load((point / "recipe.yaml").read_text())["seed"] == seed
        assert (point / "run" / "final.pt").is_file()
    tail = cluster.launch("tail", str(tmp_path / "sweep"), "-n", "2", "--launcher")
    assert tail.stdout.count("==>") == 3 and "Exiting after successful completion" in tail.stdout


@pytest.mark.timeout(300)
def test_tail_and_cancel_a_running_job_which_saves_first(cluster, tmp_path):
    import torch

    out = tmp_path / "job"
    submit(cluster, write_recipe(tmp_path / "toy.yaml", max_steps=10_000), out)
    jid = job_id(out)
    wait_for_line(f"{jid}_0_log.out", out / "submitit", r"^toy: step 3 ", timeout=90)
    launcher = cluster.launch("tail", str(out), "-n", "50", "--launcher")
    assert launcher.returncode == 0 and "toy: step 3 " in launcher.stdout
    assert "launch: rank 1/2" in cluster.launch("tail", str(out), "--rank", "1", "--launcher").stdout
    training = cluster.launch("tail", str(out))  # the training log: .err
    assert training.returncode == 0 and "toy: step" not in training.stdout
    cancel = cluster.launch("cancel", str(out))
    assert cancel.returncode == 0, cancel.stderr
    assert cluster.wait_done(jid, timeout=30)[jid] == "CANCELLED"
    (event,) = json.loads((out / "interruptions.json").read_text())
    saved = torch.load(out / "run" / "ckpt.pt", weights_only=False)["step"]
    assert event["kind"] == "cancel" and event["step"] == saved >= 3
    assert f"cancelled job {jid} after it saved a checkpoint; kept step {saved} in {out / 'run'}" in cancel.stdout
    assert f"cancel at step {saved}" in cluster.launch("status", str(out)).stdout

    # the same command resumes there; --now cancels at once, without a checkpoint
    submit(cluster, out / "recipe.yaml", out)
    jid = job_id(out)
    wait_for_line(f"{jid}_0_log.out", out / "submitit", rf"^toy: resumed at step {saved}$", timeout=120)
    cancel = cluster.launch("cancel", str(out), "--now")
    assert cancel.returncode == 0 and f"cancelled job {jid} (--now: without a checkpoint)" in cancel.stdout
    assert cluster.wait_done(jid, timeout=30)[jid] == "CANCELLED"
    assert len(json.loads((out / "interruptions.json").read_text())) == 1


@pytest.mark.timeout(240)
def test_submit_checks_the_data_before_queueing_and_status_says_why_a_job_failed(cluster, tmp_path):
    empty = tmp_path / "no-data"
    empty.mkdir()
    out = tmp_path / "job"
    args = ["submit", "recipes/demo.yaml", "--cluster", "local", "--out", str(out), f"data.data_dir={empty}",
            "max_steps=2", "train.progress=false"]
    refused = cluster.launch(*args)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "no manifest.json" in refused.stderr and "--no-data-check" in refused.stderr
    assert not out.exists() and not cluster.jobs_of(out)

    queued = cluster.launch(*args, "--no-data-check")  # as on a login node that cannot see the data
    assert queued.returncode == 0, queued.stderr
    jid = job_id(out)
    assert cluster.wait_done(jid, timeout=180) == {jid: "FAILED"}
    status = cluster.launch("status", str(out))
    assert re.search(rf"^  {jid} failed: .*DataError: .*no manifest\.json.* \(in .*{jid}_0_log\.err\)$",
                     status.stdout, re.M), status.stdout


@pytest.mark.timeout(120)
def test_a_profile_from_any_path_and_job_commands_that_find_its_cluster(cluster, tmp_path):
    profile = tmp_path / "profiles" / "mine.yaml"
    profile.parent.mkdir()
    profile.write_text((REPO / "slurm" / "clusters" / "local.yaml").read_text())
    out = tmp_path / "job"
    res = cluster.launch("submit", str(write_recipe(tmp_path / "toy.yaml", max_steps=3, step_sleep_s=0.0)),
                         "--cluster", str(profile), "--out", str(out), "--trainer", TOY)
    assert res.returncode == 0, res.stderr
    jid = job_id(out)
    assert cluster.wait_done(jid, timeout=90) == {jid: "COMPLETED"}
    info = json.loads((out / "job.json").read_text())
    assert info["cluster"] == "mine" and info["cluster_profile"] == str(profile)
    # a shell that knows nothing of the local cluster: the job folder says where the job ran
    env = {k: v for k, v in cluster.env.items() if k != "SLURM_CONF"}
    env["VSGD_SLURM_LOCAL"] = str(tmp_path / "elsewhere")
    done = {command: subprocess.run([sys.executable, "-m", "launch", command, str(out)], cwd=REPO, env=env,
                                    capture_output=True, text=True, timeout=60) for command in ("status", "tail")}
    assert all(d.returncode == 0 for d in done.values()), [d.stderr for d in done.values()]
    assert re.search(rf"^{jid}\s.*COMPLETED", done["status"].stdout, re.M), done["status"].stdout


@pytest.mark.timeout(60)
def test_sbatch_template_runs_ranks(cluster, tmp_path):
    template = REPO / "slurm" / "sbatch_template.sh"
    assert subprocess.run(["bash", "-n", str(template)]).returncode == 0
    probe = "import os; print('rank', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'], os.environ['MASTER_ADDR'])"
    jid = cluster.slurm("sbatch", "--parsable", "--ntasks-per-node=2", "--time=2", f"--chdir={REPO}",
                        f"--output={tmp_path}/%j.out", str(template), "--", sys.executable, "-c", probe).strip()
    cluster.submitted.append(jid)
    assert cluster.wait_done(jid, timeout=40) == {jid: "COMPLETED"}
    log = (tmp_path / f"{jid}.out").read_text()
    assert "rank 0 of 2 localhost" in log and "rank 1 of 2 localhost" in log


@pytest.mark.timeout(60)
def test_dry_run_prints_sbatch_and_submits_nothing(cluster, tmp_path):
    res = cluster.launch("submit", str(write_recipe(tmp_path / "toy.yaml")), "--cluster", "local", "--tasks-per-node",
                         "2", "--time", "00:05:00", "--out", str(tmp_path / "job"), "--dry-run", "--full", "lr=0.5",
                         "--trainer", TOY)
    assert res.returncode == 0, res.stderr
    for line in ["#SBATCH --ntasks-per-node=2", "#SBATCH --nodes=1", "#SBATCH --time=5",
                 "#SBATCH --partition=debug", "#SBATCH --signal=USR2@15", "#SBATCH --cpus-per-task=1",
                 f"#SBATCH --output={tmp_path}/job/submitit/%j_0_log.out"]:
        assert line in res.stdout.splitlines()
    assert "lr: 0.5" in res.stdout and "srun --unbuffered" in res.stdout and "dry run: nothing submitted" in res.stdout
    assert res.stdout.startswith("# dry run summary\n") and "1 node x 2 tasks = 2 ranks" in res.stdout
    assert "time limit:   5 min (00:05:00)" in res.stdout
    assert not (tmp_path / "job").exists()
    assert not cluster.jobs_of(tmp_path / "job")


# case -> (recipe file, extra arguments, expected error); a repeated option wins over the default.
BAD = {
    "unknown profile": ("toy.yaml", ["--cluster", "nope"], "unknown cluster profile 'nope'; known: example-a100, local "
                        "(or give a path to your own profile YAML"),
    "unknown partition": ("toy.yaml", ["--partition", "gpu"], "unknown partition 'gpu' on cluster profile 'local'; choose from debug"),
    "too many tasks": ("toy.yaml", ["--tasks-per-node", "3"], "3 tasks per node: cluster profile 'local' allows 1 to 2"),
    "too many nodes": ("toy.yaml", ["--nodes", "2"], "--nodes 2: cluster profile 'local' allows 1 to 1; restart it "
                       "with more: bash slurm/local/stop.sh && bash slurm/local/start.sh --nodes 2"),
    "gpus on a cpu cluster": ("toy.yaml", ["--gpus-per-node", "1"], "has no GPUs; use --tasks-per-node"),
    "bad time": ("toy.yaml", ["--time", "1h30"], "not a SLURM time; use MM, MM:SS, HH:MM:SS, D-HH"),
    "time over the max": ("toy.yaml", ["--time", "1-00:00:00"], "longer than the 02:00:00 allowed"),
    "missing recipe": ("missing.yaml", [], "missing.yaml' not found"),
    "recipe not a mapping": ("list.yaml", [], "must be a YAML mapping"),
    "bad override": ("toy.yaml", ["oops"], "override 'oops' is not key=value"),
    "bad trainer": ("toy.yaml", ["--trainer", "no_such_module:Trainer"], "trainer 'no_such_module:Trainer' not found"),
    "folder holds another recipe": ("toy.yaml", ["--out", "{taken}"], "already holds a different recipe"),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_before_submission(cluster, tmp_path, case):
    recipe, extra, message = BAD[case]
    write_recipe(tmp_path / "toy.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "recipe.yaml").write_text("max_steps: 1\n")
    extra = [e.format(taken=tmp_path / "taken") for e in extra]
    res = cluster.launch("submit", str(tmp_path / recipe), "--cluster", "local", "--out", str(tmp_path / "job"),
                         "--trainer", TOY, *extra)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not cluster.jobs_of(tmp_path / "job") and not cluster.jobs_of(tmp_path / "taken")
    assert not (tmp_path / "job").exists() and not (tmp_path / "taken" / "job.json").exists()


# --- no cluster needed --------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_time_strings():
    times = ["90", "1:30", "01:30:00", "00:00:01", "1-2", "1-02:00:00"]
    assert [parse_time(t) for t in times] == [90, 2, 90, 1, 1560, 1560]
    for bad in ["1h", "-5", "0", "00:61:00", "1-24:00:00"]:
        with pytest.raises(LaunchError):
            parse_time(bad)


@pytest.mark.timeout(30)
def test_profiles_are_checked(tmp_path):
    for name in ("local", "example-a100"):
        assert load_profile(name).max_tasks_per_node >= 1
    (tmp_path / "typo.yaml").write_text("gpus_per_nod: 8\n")
    with pytest.raises(LaunchError, match="unknown key 'gpus_per_nod'; did you mean 'gpus_per_node'"):
        load_profile("typo", tmp_path)
    (tmp_path / "badtype.yaml").write_text("max_nodes: many\n")
    with pytest.raises(LaunchError, match="max_nodes must be int"):
        load_profile("badtype", tmp_path)
    (tmp_path / "badtime.yaml").write_text("time_max: 3 days\n")
    with pytest.raises(LaunchError, match="time_max"):
        load_profile("badtime", tmp_path)


# --- the real trainer ---------------------------------------------------------------------
DEMO_OVERRIDES = ["optimizer=vsgd", "max_steps=60", "train.ckpt_every=10", "train.log_every=5",
                  "train.progress=false"]


@pytest.mark.timeout(1500)
def test_demo_recipe_requeues_mid_run_and_ends_bitwise_equal(cluster, tmp_path):
    """The real trainer on 2 SLURM tasks: one run uninterrupted, one preempted (USR2) after
    its step-20 checkpoint; the requeued job resumes at the step where the signal stopped it,
    and both end with identical checkpoints and TensorBoard logs."""
    reference = tmp_path / "uninterrupted"
    jid = submit_demo(cluster, reference, "--tasks-per-node", "2", *DEMO_OVERRIDES)
    assert cluster.wait_done(jid, timeout=600) == {jid: "COMPLETED"}
    out = tmp_path / "preempted"
    jid = submit_demo(cluster, out, "--tasks-per-node", "2", *DEMO_OVERRIDES)
    preempt_after(cluster, out, step=20)
    assert cluster.wait_done(jid, timeout=600) == {jid: "COMPLETED"}

    assert cluster.attempts(jid) == ["REQUEUED", "COMPLETED"]
    (event,) = json.loads((out / "interruptions.json").read_text())
    assert event["kind"] == "preemption" and 20 <= event["step"] < 60
    assert_same_checkpoint(reference / "run", out / "run", step=60)
    assert_same_scalars(reference / "run", out / "run", resumed_at=event["step"], log_every=5)
