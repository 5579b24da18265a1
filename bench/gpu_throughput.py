"""Training images/s and peak GPU memory of ResNet-50 and ViT-B/16, VSGD vs AdamW, on CUDA.

Synthetic data (random uint8 images normalized on the device, random labels), so the number
is the model and the optimizer, not the loader. Each model runs as its ImageNet recipe says
(images per GPU = global_batch / recipe.gpus, end_res, channels_last, bf16 autocast) through
the same engine (`--engine`, default the recipes' native ZeRO-2) with each optimizer's fused
path; cudnn.benchmark and TF32 on (train.fast_kernels). One process is a world of one rank
(NCCL); under torchrun each rank takes one GPU and the images/s are the whole world's.

    python bench/gpu_throughput.py [--models resnet50 vit_b16] [--engine zero] [--steps 30]

Target: VSGD's images/s >= 0.97 of AdamW's on the same engine (its optimizer step moves 36
bytes per parameter instead of 28, a small part of a training step).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vsgd_dist.config import load_recipe  # noqa: E402
from vsgd_dist.data.normalize import normalization_table, normalize_images  # noqa: E402
from vsgd_dist.distributed import (close_process_group, init_process_group_from_env, pick_device,  # noqa: E402
                                   rank_and_world, set_kernel_options)
from vsgd_dist.engines.ownership import state_bytes  # noqa: E402
from vsgd_dist.train.engine_setup import engine_for  # noqa: E402
from vsgd_dist.models import build_model  # noqa: E402

RECIPES = {"resnet50": "recipes/imagenet/resnet50_{}.yaml", "vit_b16": "recipes/imagenet/vit_b16_{}.yaml"}
OPTIMIZERS = ("vsgd", "adamw")
TARGET = 0.97


def measure(model_name: str, optimizer: str, engine_name: str, steps: int, warmup: int, device) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_recipe(os.path.join(root, RECIPES[model_name].format(optimizer)))
    _, world = rank_and_world()
    cfg.engine.name = engine_name
    cfg.optim.fused = True
    batch = cfg.train.global_batch // max(cfg.recipe.gpus, 1)
    res, dtype = cfg.data.end_res, torch.bfloat16 if cfg.data.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    model = build_model(cfg.model.name, 1000, image_size=res).to(device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    engine = engine_for(model, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_clip=0.0)),
                          cfg.optim.lr)
    pixels = torch.randint(0, 256, (batch, res, res, 3), dtype=torch.uint8, device=device)
    images = normalize_images(pixels.permute(0, 3, 1, 2), normalization_table(dtype).to(device))
    labels = torch.randint(0, 1000, (batch,), device=device)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
            loss = criterion(engine.wrapped(images), labels)
        engine.backward(loss)
        engine.step()

    for _ in range(warmup):  # cudnn autotuning, the fused kernels' compilation, state allocation
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000
    result = {"model": model_name, "optimizer": optimizer, "batch": batch, "res": res,
              "images_per_s": steps * batch * world / seconds, "step_ms": seconds * 1000 / steps,
              "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
              "state_mib": state_bytes(engine.ownership()) / 2**20,
              "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    del engine, model, images, pixels
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--engine", default="zero", choices=["ddp", "zero", "fsdp2", "deepspeed"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_throughput: no CUDA device visible; run it on a GPU machine", file=sys.stderr)
        return 1
    init_process_group_from_env()
    device = pick_device()
    set_kernel_options(True)
    rank, world = rank_and_world()
    try:
        results = [measure(m, o, args.engine, args.steps, args.warmup, device) for m in args.models for o in OPTIMIZERS]
    finally:
        close_process_group()
    if rank:
        return 0
    print(f"{torch.cuda.get_device_name(device)} x {world}, engine {args.engine}, bf16 autocast, synthetic data, "
          f"{args.steps} steps after {args.warmup}\n")
    print("| model | params | optimizer | images/GPU x res | images/s | step ms | peak GiB | optimizer state MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['params_m']:.1f}M | {r['optimizer']} | {r['batch']} x {r['res']} | "
              f"{r['images_per_s']:.0f} | {r['step_ms']:.1f} | {r['peak_gib']:.2f} | {r['state_mib']:.0f} |")
    print()
    missed = 0
    for model in args.models:
        by_opt = {r["optimizer"]: r for r in results if r["model"] == model}
        ratio = by_opt["vsgd"]["images_per_s"] / by_opt["adamw"]["images_per_s"]
        extra = by_opt["vsgd"]["peak_gib"] - by_opt["adamw"]["peak_gib"]
        ok = ratio >= TARGET
        missed += not ok
        print(f"THROUGHPUT {model}: VSGD/AdamW images/s {ratio:.3f} (target >= {TARGET}) {'OK' if ok else 'MISS'}; "
              f"peak memory VSGD {by_opt['vsgd']['peak_gib']:.2f} GiB, AdamW {by_opt['adamw']['peak_gib']:.2f} GiB "
              f"({extra:+.2f} GiB)")
    return 2 if missed else 0


if __name__ == "__main__":
    from results import run_recorded

    sys.exit(run_recorded("gpu_throughput", main))
