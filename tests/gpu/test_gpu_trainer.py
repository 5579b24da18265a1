"""The trainer on the digits demo on CUDA, every engine: bf16 autocast (DeepSpeed: its bf16
mode), bf16 uint8-on-device images, channels_last (weights too, except on DeepSpeed, which
takes contiguous ones only), an fp32 weight EMA, a periodic
checkpoint, a stop (train.stop_at, the preemption path: the stop flag crosses the group's
gloo side) and a resume that continues bit for bit like the uninterrupted run.

Bitwise needs deterministic kernels: fast_kernels=false (no cudnn.benchmark, no TF32,
deterministic algorithms). One rank per GPU, at most 2; the four engines run at once
(eight runs, then four resumes: about 90 s on one GPU).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gpu_helpers import gpu_ranks

ROOT = Path(__file__).resolve().parents[2]
ENGINES = ["ddp", "zero", "fsdp2", "deepspeed"]
STEPS, STOP = 8, 4
COMMON = ["recipes/demo.yaml", "train.progress=false", "train.log_every=2", f"max_steps={STEPS}",
          "train.ckpt_every=2", "train.precision=bf16", "data.dtype=bf16", "train.ema_decay=0.9",
          "fast_kernels=false", "optim.fused=true"]


def engine_args(engine: str) -> list[str]:
    return [f"engine={engine}", f"model.channels_last={'false' if engine == 'deepspeed' else 'true'}"]


def launch_all(runs: dict[str, list[str]], nproc: int) -> dict[str, subprocess.CompletedProcess]:
    """`launch run` for each name at once; their results by name."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen([sys.executable, "-m", "launch", "run", "--nproc", str(nproc), *COMMON, *args],
                                    cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, args in runs.items()}
    results = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=400)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_trainer")
    nproc = gpu_ranks(2)
    phases = [  # the uninterrupted and the cut runs at once, then the resumes
        {**{f"{e}/whole": [*engine_args(e), f"out={root / e / 'whole'}"] for e in ENGINES},
         **{f"{e}/cut": [*engine_args(e), f"out={root / e / 'cut'}", f"train.stop_at={STOP}"] for e in ENGINES}},
        {f"{e}/resumed": [*engine_args(e), f"out={root / e / 'cut'}"] for e in ENGINES},
    ]
    results = {}
    for phase in phases:
        results.update(launch_all(phase, nproc))
    return root, results


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def full_of(folder: Path) -> dict:
    from vsgd_dist.train.checkpoint import latest_checkpoint, read_full

    return read_full(latest_checkpoint(folder))


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("engine", ENGINES)
def test_trainer_on_cuda_stops_saves_and_resumes_bitwise(runs, engine):
    root, results = runs
    for phase in ("whole", "cut", "resumed"):
        result = results[f"{engine}/{phase}"]
        assert result.returncode == 0, f"{engine}/{phase}:\n{result.stdout[-4000:]}"
    assert f"stopped at step {STOP}" in results[f"{engine}/cut"].stdout
    assert f"completed at step {STEPS}" in results[f"{engine}/resumed"].stdout

    whole, resumed = scalars(root / engine / "whole"), scalars(root / engine / "cut")
    assert whole["train/loss"] == resumed["train/loss"] and len(whole["train/loss"]) == STEPS // 2
    for tag in ("val/top1", "val/nll", "val_ema/top1", "val_ema/nll"):
        assert whole[tag] == resumed[tag], tag
    assert "memory/cuda_max_allocated_mib" in whole and "time/forward_backward_ms" in whole

    a, b = full_of(root / engine / "whole" / "checkpoints"), full_of(root / engine / "cut" / "checkpoints")
    assert a["meta"]["step"] == b["meta"]["step"] == STEPS
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for name, state in a["optimizer"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"][name][key])), (name, key)
