"""Training images/s of ResNet-50 at 64 px on N CPU processes, VSGD against AdamW, as their
ImageNet recipes configure them (engine, ZeRO stage, fused optimizers, weight decay, label
smoothing, channels_last, BlurPool).

Synthetic data (random normalized images and labels, the same every step), so the number is
the model, the engine and the optimizer, not the loader. Every rank builds both recipes'
engines over two copies of the model, and the two step in turn (forward, backward, the
engine's step), so load on the machine hits both alike; images/s = global batch / median
step time of the slowest rank. The recipes leave the parameters' all-gather running after a
step (engine.prefetch_params); here it is waited for inside the timed step, so neither
engine's gather hides in the other's time. A second table runs VSGD alone for `--steps`
consecutive steps with and without that prefetch: the overlap with the next forward.

    python bench/train_throughput.py [--nproc 2] [--batch 32] [--res 64] [--steps 8]

Target: VSGD's images/s >= 0.97 of AdamW's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vsgd_dist.config import load_recipe  # noqa: E402
from vsgd_dist.engines.sampling import WeightSampling  # noqa: E402
from vsgd_dist.train.engine_setup import engine_for  # noqa: E402
from vsgd_dist.models import build_model  # noqa: E402
from vsgd_dist.optim import OPTIMIZERS  # noqa: E402
from vsgd_dist.spawn import run_distributed  # noqa: E402

RECIPE = "recipes/imagenet/resnet50_{}.yaml"
OPTIMIZER_NAMES = ("vsgd", "adamw")
TARGET = 0.97


def make_engine(optimizer: str, res: int, prefetch: bool | None = None):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_recipe(os.path.join(root, RECIPE.format(optimizer)))
    if prefetch is not None:
        cfg.engine.prefetch_params = prefetch
    torch.manual_seed(0)
    model = build_model(cfg.model.name, 1000, image_size=res, blurpool=cfg.model.blurpool)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    return engine_for(model, cfg, cfg.optim.lr), criterion, cfg


def bench_rank(rank, world_size, batch, res, steps, warmup):
    torch.set_num_threads(1)
    engines = {name: make_engine(name, res) for name in OPTIMIZER_NAMES}
    generator = torch.Generator().manual_seed(rank)
    images = torch.randn(batch, 3, res, res, generator=generator).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), generator=generator)
    times = {name: [] for name in engines}
    phases = {name: [] for name in engines}
    for i in range(warmup + steps):
        for name, (engine, criterion, _) in engines.items():
            dist.barrier()
            start = time.perf_counter()
            engine.backward(criterion(engine.wrapped(images), labels))
            middle = time.perf_counter()
            engine.step()
            WeightSampling(engine).mean_weights()  # a prefetched gather ends here, not in the other engine's barrier
            end = time.perf_counter()
            seconds = torch.tensor([end - start, end - middle])
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
            if i >= warmup:
                times[name].append(seconds[0].item())
                phases[name].append(seconds[1].item())
    setup = ", ".join(f"{name}: engine {cfg.engine.name} stage {cfg.engine.zero_stage}, fused "
                      f"{OPTIMIZERS.get(name).use_fused(cfg.optim.fused)}" for name, (_, _, cfg) in engines.items())
    return {name: (statistics.median(times[name]), statistics.median(phases[name])) for name in engines}, setup


def overlap_rank(rank, world_size, batch, res, steps, warmup):
    """Seconds per step of VSGD's recipe over `steps` consecutive steps (slowest rank), with
    the parameters' all-gather waited for in the step and left to the next forward."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(rank)
    images = torch.randn(batch, 3, res, res, generator=generator).to(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), generator=generator)
    result = {}
    for prefetch in (False, True):
        engine, criterion, _ = make_engine("vsgd", res, prefetch)
        for i in range(warmup + steps):
            if i == warmup:
                WeightSampling(engine).mean_weights()
                dist.barrier()
                start = time.perf_counter()
            engine.backward(criterion(engine.wrapped(images), labels))
            engine.step()
        WeightSampling(engine).mean_weights()
        seconds = torch.tensor([(time.perf_counter() - start) / steps])
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        result[prefetch] = seconds.item()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="images per rank per step")
    parser.add_argument("--res", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {args.nproc} processes x 1 thread, ResNet-50 at {args.res} px, "
          f"{args.batch} images per rank, median of {args.steps} steps; load average {os.getloadavg()[0]:.1f}")
    result, setup = run_distributed(bench_rank, args.nproc, args.batch, args.res, args.steps, args.warmup,
                                    timeout=7200)[0]
    print(f"{RECIPE.format('{vsgd,adamw}')}: {setup}; load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| optimizer | images/s | step s | of which engine.step() s |")
    print("|---|---|---|---|")
    for name, (seconds, step) in result.items():
        print(f"| {name} | {args.nproc * args.batch / seconds:.1f} | {seconds:.3f} | {step:.3f} |")
    ratio = result["adamw"][0] / result["vsgd"][0]
    print(f"\nTHROUGHPUT resnet50 {args.res}px x {args.nproc}: VSGD/AdamW images/s {ratio:.3f} "
          f"(target >= {TARGET}) {'OK' if ratio >= TARGET else 'MISS'}")
    overlap = run_distributed(overlap_rank, args.nproc, args.batch, args.res, args.steps, args.warmup,
                              timeout=7200)[0]
    print(f"\nVSGD alone, {args.steps} consecutive steps; load average {os.getloadavg()[0]:.1f}\n")
    print("| parameters' all-gather | step s | images/s |\n|---|---|---|")
    for prefetch, seconds in overlap.items():
        label = "left to the next forward (prefetch)" if prefetch else "waited for in the step"
        print(f"| {label} | {seconds:.3f} | {args.nproc * args.batch / seconds:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
