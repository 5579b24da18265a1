"""Fused VSGD's Triton kernel (`vsgd_dist/optim/vsgd_triton.py`) at several block sizes and
warp counts against torch's fused AdamW, on
ResNet-50's list of 161 tensors and on one flat shard of ViT-B/16 (half of it, as ZeRO on 2
ranks hands the optimizer). Variants step the same tensors in turn (median of `--steps`
rounds, each step between two synchronizations), so the ratios are comparable.

    python bench/vsgd_triton_configs.py [--steps 9]

The defaults in vsgd_triton.py are the fastest row here; the table shows by how much.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_shapes import numel, resnet50_shapes, vit_b16_shapes  # noqa: E402

from vsgd_dist import VSGD  # noqa: E402
from vsgd_dist.optim import vsgd_triton  # noqa: E402

CONFIGS = [(512, 4), (1024, 2), (1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8)]
"""(BLOCK, NUM_WARPS)."""


def lists() -> dict[str, list[tuple[int, ...]]]:
    return {"resnet50 (161 tensors)": resnet50_shapes(), "vit_b16 shard 1/2": [(numel(vit_b16_shapes()) // 2,)]}


def configured(block: int, warps: int):
    def apply():  # each optimizer's table keeps the BLOCK it was built with
        vsgd_triton.BLOCK, vsgd_triton.NUM_WARPS = block, warps
    return apply


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=9)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("vsgd_triton_configs: no CUDA device visible; run it on a GPU machine", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, median of {args.steps} rounds")
    print("\n| tensors | elements | variant | step ms | GB/s | vs AdamW fused |\n|---|---|---|---|---|---|")
    for label, shapes in lists().items():
        gen = torch.Generator(device="cuda").manual_seed(0)
        params = [torch.randn(s, device="cuda", generator=gen).requires_grad_() for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, device="cuda", generator=gen) * 1e-2
        variants = {f"VSGD BLOCK {b}, {w} warps": (VSGD(params, lr=1e-3, fused=True), configured(b, w), 36)
                    for b, w in CONFIGS}
        variants["AdamW fused"] = (torch.optim.AdamW(params, lr=1e-3, fused=True), lambda: None, 28)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for round_ in range(2 + args.steps):  # 2 warm-up rounds: state allocation, kernel builds
            for name, (opt, apply, _) in variants.items():
                apply()
                torch.cuda.synchronize()
                start = time.perf_counter()
                opt.step()
                torch.cuda.synchronize()
                if round_ >= 2:
                    times[name].append(time.perf_counter() - start)
        n = sum(p.numel() for p in params)
        base = statistics.median(times["AdamW fused"])
        for name, (_, _, bytes_per) in variants.items():
            seconds = statistics.median(times[name])
            print(f"| {label} | {n / 1e6:.1f}M | {name} | {seconds * 1e3:.3f} | {bytes_per * n / seconds / 1e9:.0f} | "
                  f"{seconds / base:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    from results import run_recorded

    sys.exit(run_recorded("vsgd_triton_configs", main))
