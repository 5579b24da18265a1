"""DeepSpeed ZeRO-2 against the native ZeroOptimizer (stage 2), VSGD and AdamW, on N gloo
processes; and DeepSpeed's ZeRO settings, measured (`--variants`).

The engines are the trainer's own (`build_engine`: the DeepSpeed config comes from
`deepspeed_config`, two param groups with weight decay on/off), driven by
`sharded_step.SyntheticModel` (ResNet-50 / ViT-B/16 parameter shapes, gradient = a fixed
random tensor). Per step: `backward` (native ZeRO-2 and DeepSpeed reduce gradients here)
and `step` (clip-norm, optimizer step on this rank's flat partition, parameter all-gather):
the trainer's time/optimizer_ms. DeepSpeed's AdamW is torch's (`torch_adam`), as the
engine configures it. One fresh process group per row: DeepSpeed engines are not fully
freed by `del`.

`--variants`: DeepSpeed ZeRO-2 with `deepspeed_config`'s settings against one change each
(overlap_comm on, contiguous_gradients off, DeepSpeed's default 5e8-element buckets), all
built in the same processes and stepping in turn, with the gradient bucket buffers each
allocates for a backward (contiguous_gradients: one of reduce_bucket_size elements, two with
overlap_comm; on a GPU that is device memory).

    python bench/deepspeed_step.py [--models resnet50 vit_b16] [--world-sizes 2 4] [--steps 3] [--variants]
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
from sharded_step import SyntheticModel, slowest_rank  # noqa: E402

from vsgd_dist.config import RunConfig  # noqa: E402
from vsgd_dist.engines.ownership import state_bytes  # noqa: E402
from vsgd_dist.train.engine_setup import engine_for  # noqa: E402
from vsgd_dist.engines import deepspeed as deepspeed_engine  # noqa: E402
from vsgd_dist.spawn import run_distributed  # noqa: E402

ENGINES = {"DeepSpeed ZeRO-2": "deepspeed", "native ZeRO-2": "zero"}
# (optimizer, fused): each VSGD row is compared with the AdamW row of the same kind (torch's
# fused AdamW against VSGD's fused kernel, multi-tensor against unfused).
OPTIMIZERS = (("adamw", False), ("vsgd", False), ("adamw", True), ("vsgd", True))
VARIANTS = {"deepspeed_config": {}, "overlap_comm on": {"overlap_comm": True},
            "contiguous_gradients off": {"contiguous_gradients": False},
            "buckets 5e8 elements": {"reduce_bucket_size": int(5e8), "allgather_bucket_size": int(5e8)}}


def bench_config(engine: str, optimizer: str, fused: bool | None, world_size: int) -> RunConfig:
    cfg = RunConfig()
    cfg.engine.name, cfg.engine.zero_stage = engine, 2
    cfg.optim.name, cfg.optim.weight_decay, cfg.optim.fused = optimizer, 0.05, fused
    cfg.train.global_batch = world_size
    cfg.model.channels_last = False
    return cfg


def one_step(engine) -> tuple[float, float]:
    """The slowest rank's backward and step seconds of one training step."""
    dist.barrier()
    start = time.perf_counter()
    engine.backward(engine.wrapped())
    middle = time.perf_counter()
    engine.step()
    end = time.perf_counter()
    return slowest_rank(middle - start), slowest_rank(end - middle)


def time_phases(engine, steps: int) -> tuple[float, float]:
    """Medians over steps (one warm-up first) of the slowest rank's backward and step seconds."""
    backward, step = zip(*[one_step(engine) for _ in range(steps + 1)][1:])
    return statistics.median(backward), statistics.median(step)


def bench_rank(rank, world_size, model_name, engine_name, optimizer, fused, steps):
    engine = engine_for(SyntheticModel(MODELS[model_name]()),
                          bench_config(engine_name, optimizer, fused, world_size), 1e-3)
    backward, step = time_phases(engine, steps)
    return state_bytes(engine.ownership()), backward, step


def variant_engine(model_name: str, optimizer: str, world_size: int, changes: dict):
    """A DeepSpeed ZeRO-2 engine whose config is `deepspeed_config`'s with `changes`, and a
    record of the gradient bucket buffers it allocates for each backward."""
    original = deepspeed_engine.deepspeed_config

    def changed(*args, **kwargs):
        config = original(*args, **kwargs)
        config["zero_optimization"].update(changes)
        return config
    deepspeed_engine.deepspeed_config = changed
    try:
        engine = engine_for(SyntheticModel(MODELS[model_name]()), bench_config("deepspeed", optimizer, None,
                                                                                 world_size), 1e-3)
    finally:
        deepspeed_engine.deepspeed_config = original
    zero, buffers = engine._zero, []  # DeepSpeed's own ZeRO optimizer, measured from outside
    setup = zero.setup_buckets

    def recorded_setup():
        setup()
        buffers.append(sum(b.nbytes for bucket in zero.ipg_buckets.values() for b in bucket.buffer))
    zero.setup_buckets = recorded_setup
    return engine, buffers


def variants_rank(rank, world_size, model_name, optimizer, steps):
    """Every variant's engine in this process group, stepping in turn."""
    engines = {label: variant_engine(model_name, optimizer, world_size, changes) for label, changes in VARIANTS.items()}
    times = {label: ([], []) for label in engines}
    for i in range(steps + 1):
        for label, (engine, _) in engines.items():
            backward, step = one_step(engine)
            if i > 0:
                times[label][0].append(backward)
                times[label][1].append(step)
    return {label: (statistics.median(times[label][0]), statistics.median(times[label][1]), max(buffers))
            for label, (_, buffers) in engines.items()}


def engines_table(args) -> None:
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


def variants_table(args) -> None:
    print("| model | N | DeepSpeed ZeRO-2 | optimizer | backward s | step s | gradient buckets MiB/rank |")
    print("|---|---|---|---|---|---|---|")
    for model_name in args.models:
        for world_size in args.world_sizes:
            for optimizer in ("adamw", "vsgd"):
                rows = run_distributed(variants_rank, world_size, model_name, optimizer, args.steps, timeout=3600)
                for label, (backward, step, buffers) in rows[0].items():
                    print(f"| {model_name} | {world_size} | {label} | {optimizer} | {backward:.3f} | {step:.3f} "
                          f"| {buffers / 2**20:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_b16"], choices=sorted(MODELS))
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", action="store_true", help="DeepSpeed's ZeRO settings instead of the engines")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, gloo, 1 thread per rank, "
          f"median of {args.steps} steps; load average {os.getloadavg()[0]:.1f} at start\n")
    (variants_table if args.variants else engines_table)(args)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    from results import run_recorded

    sys.exit(run_recorded("deepspeed_step", main))
