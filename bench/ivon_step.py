"""IVON's fused optimizer work per iteration vs the fused AdamW and VSGD steps, on ResNet-50
and ViT-B/16 parameter lists, plus optimizer state bytes per parameter.

IVON does two things per iteration: `sample` (draw the counter-based noise, write m_w + eps)
before the forward and `step` after the backward; the rows time both together and the
sample alone (with `restore`, which puts m_w back). Timing as in optim_step.py (one process,
median of steps). State bytes count the tensors kept between steps; IVON additionally holds
m_w and eps from `sample` to `step` (8 B per fp32 parameter more, freed by `step`).

    python bench/ivon_step.py [--models resnet50 vit_b16] [--steps 5] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_shapes import MODELS, numel  # noqa: E402
from optim_step import time_steps  # noqa: E402

from vsgd_dist import IVON, VSGD  # noqa: E402


class _Iteration:
    """Presents IVON's per-iteration work as `step()` for `time_steps` (the gradient stays
    in `.grad` between calls, as there)."""

    def __init__(self, optimizer: IVON, finish: str):
        self.optimizer, self.finish = optimizer, finish

    def step(self) -> None:
        self.optimizer.sample(0)
        getattr(self.optimizer, self.finish)()


def _ivon(params, finish: str) -> _Iteration:
    return _Iteration(IVON(params, lr=0.1, ess=1_281_167, hess_init=0.05, weight_decay=5e-5, fused=True), finish)


VARIANTS = {
    "AdamW fused step": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05, fused=True),
    "VSGD fused step": lambda p: VSGD(p, lr=1e-3, weight_decay=0.05, fused=True),
    "IVON fused sample + step": lambda p: _ivon(p, "step"),
    "IVON fused sample + restore": lambda p: _ivon(p, "restore"),
}


def state_bytes_per_param(optimizer, n: int) -> float:
    """Bytes of per-element state tensors (not the scalar step counters) per parameter."""
    total = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
    return total / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.steps} steps\n")
    print("| model | params | optimizer | ms | vs AdamW fused step | state B/param |")
    print("|---|---|---|---|---|---|")
    for model in args.models:
        shapes = MODELS[model]()
        n = numel(shapes)
        built = {}

        def keep(name):
            def make(params):
                built[name] = VARIANTS[name](params)
                return built[name]
            return make

        results = {name: time_steps(keep(name), shapes, args.steps, args.warmup) for name in VARIANTS}
        base = results["AdamW fused step"]
        for name, seconds in results.items():
            optimizer = getattr(built[name], "optimizer", built[name])
            print(f"| {model} | {n / 1e6:.1f}M | {name} | {seconds * 1e3:.1f} | {seconds / base:.2f}x | "
                  f"{state_bytes_per_param(optimizer, n):.0f} |")


if __name__ == "__main__":
    main()
