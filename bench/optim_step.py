"""Optimizer-step time of VSGD and torch AdamW on ResNet-50 and ViT-B/16 parameter lists and
on one flat shard of them (what the sharded engines hand the optimizer).

Variants share the parameters and gradients and step in turn (round robin, median of
`--steps` rounds), so load on the machine hits them alike and the ratios are comparable.
Bandwidth = bytes the step must move / time: VSGD reads param, grad and 3 state tensors and
writes param + state (36 B per fp32 element), AdamW 28 B.

On CPU two more tables: the one-off build of the fused kernel (in an empty cache), and the
unfused VSGD step with the rank processes' allocator settings (`vsgd_dist.allocator`) against
plain glibc, each in a fresh process (the settings are read at process start); "one piece"
is the unfused step on whole tensors (no 64K-element pieces), as the step was before it cut them.

    python bench/optim_step.py [--models resnet50 vit_b16] [--steps 7] [--threads N] [--device cuda]
        [--shard-of 2] [--optimizers "VSGD fused" "AdamW fused"] [--no-allocator-table]

On CUDA each step is timed between two synchronizations (the GPU's time for the step).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_shapes import MODELS, numel  # noqa: E402

from vsgd_dist import VSGD, allocator  # noqa: E402
from vsgd_dist.optim import cpp_kernel, vsgd_cpu, vsgd_update  # noqa: E402

VARIANTS = {
    "VSGD per-tensor": (lambda p: VSGD(p, lr=1e-3, weight_decay=0.05, foreach=False), 36),
    "VSGD foreach": (lambda p: VSGD(p, lr=1e-3, weight_decay=0.05, foreach=True), 36),
    "VSGD fused": (lambda p: VSGD(p, lr=1e-3, weight_decay=0.05, fused=True), 36),
    "AdamW foreach": (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05, foreach=True), 28),
    "AdamW fused": (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05, fused=True), 28),
}
SHARD_VARIANTS = ("VSGD per-tensor", "VSGD fused", "AdamW fused")
UNFUSED = ("VSGD per-tensor", "VSGD foreach")
ALLOCATOR_VARS = ("LD_PRELOAD", "MALLOC_CONF", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")


def make_params(shapes, device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(device)
    return params


def time_round_robin(names, shapes, steps: int, warmup: int, device: str) -> dict[str, float]:
    """Median seconds per step of each variant, all stepping the same parameters in turn."""
    params = make_params(shapes, device)
    optimizers = {name: VARIANTS[name][0](params) for name in names}
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + steps):  # warm-up: state allocation, the fused kernel's load
        for name, opt in optimizers.items():
            sync()
            start = time.perf_counter()
            opt.step()
            sync()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def print_rows(label: str, n: int, results: dict[str, float]) -> None:
    base = results["AdamW fused"]
    for name, seconds in results.items():
        gbps = VARIANTS[name][1] * n / seconds / 1e9
        print(f"| {label} | {n / 1e6:.1f}M | {name} | {seconds * 1e3:.1f} | {gbps:.1f} | {seconds / base:.2f}x |",
              flush=True)


def one_off_build(device: str) -> str:
    """Seconds the fused kernel takes before its first step, from an empty cache."""
    if torch.device(device).type == "cpu":
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            cpp_kernel.library_path("vsgd", vsgd_cpu.SOURCE, Path(tmp))
            return f"C++ kernel build (g++, empty cache): {time.perf_counter() - start:.1f} s"
    params = make_params([(1000,), (64, 3, 7, 7)], device)
    start = time.perf_counter()
    VSGD(params, lr=1e-3, fused=True).step()
    torch.cuda.synchronize()
    return f"first fused step (Triton kernel build, empty cache unless TRITON_CACHE_DIR is warm): {time.perf_counter() - start:.1f} s"


def unfused_worker(model: str, shard_of: int, steps: int, whole: bool) -> dict[str, float]:
    """In a fresh process: median unfused VSGD step times (per-tensor, foreach, flat shard)."""
    if whole:
        vsgd_update.CHUNK = 2**62
    shapes = MODELS[model]()
    results = time_round_robin(UNFUSED, shapes, steps, 1, "cpu")
    shard = time_round_robin(["VSGD per-tensor"], [(numel(shapes) // shard_of,)], steps, 1, "cpu")
    return {**results, f"VSGD per-tensor, 1/{shard_of} flat shard": shard["VSGD per-tensor"]}


def allocator_table(models, shard_of: int, steps: int, threads: int) -> None:
    plain = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_VARS}
    tuned = {**plain, **allocator.allocator_env(plain)}
    print(f"\nUnfused VSGD, rank allocator settings ({' '.join(f'{k}={v}' for k, v in allocator.allocator_env(plain).items())}) "
          f"vs plain glibc, ms per step (median of {steps}; one piece: median of 3)\n")
    print("| model | path | tuned | untuned | untuned / tuned | untuned, one piece | tuned, one piece |")
    print("|---|---|---|---|---|---|---|")
    for model in models:
        def run(env, whole, n):
            cmd = [sys.executable, __file__, "--unfused-worker", model, "--shard-of", str(shard_of),
                   "--steps", str(n), "--threads", str(threads)] + (["--whole"] if whole else [])
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            return json.loads(out.splitlines()[-1])
        fast, slow = run(tuned, False, steps), run(plain, False, steps)
        slow_whole, fast_whole = run(plain, True, 3), run(tuned, True, 3)
        for path in fast:
            print(f"| {model} | {path} | {fast[path] * 1e3:.0f} | {slow[path] * 1e3:.0f} | {slow[path] / fast[path]:.2f}x "
                  f"| {slow_whole[path] * 1e3:.0f} | {fast_whole[path] * 1e3:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--shard-of", type=int, default=2, help="flat shard size: 1/N of the model (N ranks)")
    parser.add_argument("--optimizers", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="variants to time (AdamW fused is always one: the reference)")
    parser.add_argument("--no-allocator-table", action="store_true")
    parser.add_argument("--unfused-worker", help=argparse.SUPPRESS)
    parser.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.unfused_worker:
        print(json.dumps(unfused_worker(args.unfused_worker, args.shard_of, args.steps, args.whole)))
        return
    cpu = torch.device(args.device).type == "cpu"
    where = f"{args.threads} threads" if cpu else torch.cuda.get_device_name(args.device)
    print(f"torch {torch.__version__}, {where}, median of {args.steps} rounds; "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print(one_off_build(args.device) + "\n")
    print("| model | params | optimizer | step ms | GB/s | vs AdamW fused |")
    print("|---|---|---|---|---|---|")
    names = list(dict.fromkeys([*args.optimizers, "AdamW fused"]))
    for model in args.models:
        shapes = MODELS[model]()
        print_rows(model, numel(shapes), time_round_robin(names, shapes, args.steps, args.warmup, args.device))
    for model in args.models:
        n = numel(MODELS[model]()) // args.shard_of
        print_rows(f"{model} shard 1/{args.shard_of}", n, time_round_robin(
            [name for name in names if name in SHARD_VARIANTS], [(n,)], args.steps, args.warmup, args.device))
    if cpu and not args.no_allocator_table:
        allocator_table(args.models, args.shard_of, args.steps, args.threads)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    from results import run_recorded

    sys.exit(run_recorded("optim_step", main, record="--unfused-worker" not in sys.argv))
