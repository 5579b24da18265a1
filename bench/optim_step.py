"""Optimizer-step time of VSGD and torch AdamW on ResNet-50 and ViT-B/16 parameter lists.

All variants run side by side in one process on the same machine state, so the ratios are
comparable. Bandwidth = bytes the step must move / time: VSGD reads param, grad and 3
state tensors and writes param + state (36 B per fp32 element), AdamW 28 B.

    python bench/optim_step.py [--models resnet50 vit_b16] [--steps 5] [--threads N] [--device cuda]

On CUDA each step is timed between two synchronizations (the GPU's time for the step).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_shapes import MODELS, numel  # noqa: E402

from vsgd_dist import VSGD  # noqa: E402

VARIANTS = {
    "VSGD per-tensor": (lambda p: VSGD(p, lr=1e-3, weight_decay=0.05, foreach=False), 36),
    "VSGD foreach": (lambda p: VSGD(p, lr=1e-3, weight_decay=0.05, foreach=True), 36),
    "VSGD fused": (lambda p: VSGD(p, lr=1e-3, weight_decay=0.05, fused=True), 36),
    "AdamW foreach": (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05, foreach=True), 28),
    "AdamW fused": (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05, fused=True), 28),
}


def time_steps(make, shapes, steps: int, warmup: int, device: str = "cpu") -> float:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(device)
    opt = make(params)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):  # state allocation and, for fused VSGD, compilation
        opt.step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]  # median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"{args.threads} threads"
    print(f"torch {torch.__version__}, {where}, median of {args.steps} steps\n")
    print("| model | params | optimizer | step ms | GB/s | vs AdamW fused |")
    print("|---|---|---|---|---|---|")
    for model in args.models:
        shapes = MODELS[model]()
        n = numel(shapes)
        results = {name: time_steps(make, shapes, args.steps, args.warmup, args.device)
                   for name, (make, _) in VARIANTS.items()}
        base = results["AdamW fused"]
        for name, seconds in results.items():
            gbps = VARIANTS[name][1] * n / seconds / 1e9
            print(f"| {model} | {n / 1e6:.1f}M | {name} | {seconds * 1e3:.1f} | {gbps:.1f} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
