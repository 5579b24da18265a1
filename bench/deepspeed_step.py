"""DeepSpeed ZeRO-2 against the native ZeroOptimizer (stage 2), VSGD and AdamW, on N gloo processes.

The engines are the trainer's own (`build_engine`: the DeepSpeed config comes from
`deepspeed_config`, two param groups with weight decay on/off), driven by
`sharded_step.SyntheticModel` (ResNet-50 / ViT-B/16 parameter shapes, gradient = a fixed
random tensor). Per step: `backward` (native ZeRO-2 and DeepSpeed reduce gradients here)
and `step` (clip-norm, optimizer step on this rank's flat partition, parameter all-gather):
the trainer's time/optimizer_ms. DeepSpeed's AdamW is torch's (`torch_adam`), as the
engine configures it. Same allocator settings as sharded_step.py.

    python bench/deepspeed_step.py [--models resnet50 vit_b16] [--world-sizes 2 4] [--steps 3]
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_shapes import MODELS  # noqa: E402
from sharded_step import SyntheticModel  # noqa: E402

from vsgd_dist.config import RunConfig  # noqa: E402
from vsgd_dist.engines import build_engine  # noqa: E402
from vsgd_dist.spawn import run_distributed  # noqa: E402

ENGINES = {"DeepSpeed ZeRO-2": "deepspeed", "native ZeRO-2": "zero"}
OPTIMIZERS = ("adamw", "vsgd")


def bench_config(engine: str, optimizer: str, world_size: int) -> RunConfig:
    cfg = RunConfig()
    cfg.engine.name, cfg.engine.zero_stage = engine, 2
    cfg.optim.name, cfg.optim.weight_decay = optimizer, 0.05
    cfg.train.global_batch = world_size
    return cfg


def slowest_rank(seconds: float) -> float:
    t = torch.tensor(seconds)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def time_phases(engine, steps: int) -> tuple[float, float]:
    """Medians over steps (one warm-up first) of the slowest rank's backward and step seconds."""
    backward, step = [], []
    for i in range(steps + 1):
        dist.barrier()
        start = time.perf_counter()
        engine.backward(engine.module())
        middle = time.perf_counter()
        engine.step()
        end = time.perf_counter()
        if i > 0:
            backward.append(slowest_rank(middle - start))
            step.append(slowest_rank(end - middle))
    return statistics.median(backward), statistics.median(step)


def bench_rank(rank, world_size, model_name, steps):
    shapes = MODELS[model_name]()
    rows = []
    for label, engine_name in ENGINES.items():
        for optimizer in OPTIMIZERS:
            engine = build_engine(SyntheticModel(shapes), bench_config(engine_name, optimizer, world_size), lr=1e-3)
            backward, step = time_phases(engine, steps)
            rows.append((label, optimizer, engine.state_bytes(), backward, step))
            del engine
            gc.collect()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_b16"], choices=sorted(MODELS))
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    os.environ.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(2**40))  # as sharded_step.py
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, gloo, 1 thread per rank, "
          f"median of {args.steps} steps\n")
    print("| model | N | engine | optimizer | state MiB/rank | backward s | step s | step vs AdamW |")
    print("|---|---|---|---|---|---|---|---|")
    for model_name in args.models:
        for world_size in args.world_sizes:
            rows = run_distributed(bench_rank, world_size, model_name, args.steps, timeout=1800)
            adamw_step = {}
            for i, (engine, optimizer, _, backward, step) in enumerate(rows[0]):
                state = max(r[i][2] for r in rows)
                adamw_step.setdefault(engine, step)  # AdamW runs first on each engine
                print(f"| {model_name} | {world_size} | {engine} | {optimizer} | {state / 2**20:.1f} "
                      f"| {backward:.3f} | {step:.3f} | {step / adamw_step[engine]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
