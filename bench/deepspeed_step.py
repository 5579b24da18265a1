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
# (optimizer, fused): each VSGD row is compared with the AdamW row of the same kind (torch's
# fused AdamW against VSGD's compiled kernel, multi-tensor against unfused).
OPTIMIZERS = (("adamw", False), ("vsgd", False), ("adamw", True), ("vsgd", True))


def bench_config(engine: str, optimizer: str, fused: bool, world_size: int) -> RunConfig:
    cfg = RunConfig()
    cfg.engine.name, cfg.engine.zero_stage = engine, 2
    cfg.optim.name, cfg.optim.weight_decay, cfg.optim.fused = optimizer, 0.05, fused
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
        engine.backward(engine.wrapped())
        middle = time.perf_counter()
        engine.step()
        end = time.perf_counter()
        if i > 0:
            backward.append(slowest_rank(middle - start))
            step.append(slowest_rank(end - middle))
    return statistics.median(backward), statistics.median(step)


def bench_rank(rank, world_size, model_name, engine_name, optimizer, fused, steps):
    """One row per process group: DeepSpeed engines are not fully freed by `del`, so a
    fresh spawn per row keeps memory flat (ViT-B at 4 ranks)."""
    engine = build_engine(SyntheticModel(MODELS[model_name]()),
                          bench_config(engine_name, optimizer, fused, world_size), lr=1e-3)
    backward, step = time_phases(engine, steps)
    return engine.state_bytes(), backward, step


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
            for label, engine_name in ENGINES.items():
                adamw_step = {}
                for optimizer, fused in OPTIMIZERS:
                    rows = run_distributed(bench_rank, world_size, model_name, engine_name, optimizer, fused,
                                           args.steps, timeout=1800)
                    state = max(r[0] for r in rows)
                    _, backward, step = rows[0]
                    adamw_step.setdefault(fused, step)  # AdamW runs first for each kind
                    name = optimizer + (" fused" if fused else "")
                    print(f"| {model_name} | {world_size} | {label} | {name} | {state / 2**20:.1f} "
                          f"| {backward:.3f} | {step:.3f} | {step / adamw_step[fused]:.2f}x |", flush=True)

if __name__ == "__main__":
    main()
