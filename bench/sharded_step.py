"""Per-rank optimizer-state bytes and time per training step of the sharding strategies.

On N gloo processes (CPU), for ResNet-50 and ViT-B/16 parameter lists (real shapes from
`model_shapes`), side by side: DDP + unsharded optimizer, ZeroOptimizer stage 1 (on DDP)
and stage 2, and FSDP2, each with VSGD and AdamW. A "step" is a trivial forward/backward
whose gradient is a fixed random tensor (loss = sum(p * r)), so every strategy does its
real communication where it normally does (DDP/ZeRO-2 hooks in backward, FSDP2 all-gather
in forward), then the optimizer step and the parameter gather. The `fwd+bwd` row is that
trivial forward/backward alone on one process, for reference.

glibc hands large freed blocks back to the OS, so on CPU every step would page-fault its
temporaries again (several x slower for big flat tensors); like a GPU caching allocator, the
ranks keep them (MALLOC_MMAP_MAX_=0), for every strategy alike. With N above the core
count the ranks share cores: such timings show overheads, not scaling.

    python bench/sharded_step.py [--models resnet50 vit_b16] [--world-sizes 1 2 4] [--steps 3]
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
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_shapes import MODELS, numel  # noqa: E402

from vsgd_dist import VSGD, ZeroOptimizer  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy  # noqa: E402

from vsgd_dist.engines.fsdp2 import shard_model  # noqa: E402
from vsgd_dist.spawn import run_distributed  # noqa: E402

OPTIMIZERS = {"VSGD": (VSGD, dict(lr=1e-3, weight_decay=0.05)),
              "AdamW": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.05))}
STRATEGIES = ("DDP", "ZeRO-1", "ZeRO-2", "FSDP2")


class Block(nn.Module):
    """Parameters of consecutive layers; forward adds sum(p * r) so that grad(p) = r."""

    def __init__(self, shapes, generator):
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(s, generator=generator) * 0.02) for s in shapes)
        for i, s in enumerate(shapes):
            self.register_buffer(f"r{i}", torch.randn(s, generator=generator) * 1e-2, persistent=False)

    def forward(self, x):
        return x + sum((p * getattr(self, f"r{i}")).sum() for i, p in enumerate(self.weights))


class SyntheticModel(nn.Module):
    def __init__(self, shapes, num_blocks: int = 12):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        target = numel(shapes) / num_blocks
        chunks, filled = [[]], 0
        for s in shapes:
            if chunks[-1] and filled >= target:
                chunks.append([])
                filled = 0
            chunks[-1].append(s)
            filled += numel([s])
        self.blocks = nn.ModuleList(Block(c, generator) for c in chunks)

    def forward(self):
        x = torch.zeros(())
        for block in self.blocks:
            x = block(x)
        return x


def build(strategy: str, opt_name: str, shapes):
    """(model to call, optimizer, function giving this rank's per-element state bytes)."""
    optimizer_class, kwargs = OPTIMIZERS[opt_name]
    model = SyntheticModel(shapes)
    if strategy == "DDP":
        opt = optimizer_class(model.parameters(), **kwargs)
        return nn.parallel.DistributedDataParallel(model), opt, lambda: local_state_bytes(opt)
    if strategy == "ZeRO-1":
        wrapped = nn.parallel.DistributedDataParallel(model)
        opt = ZeroOptimizer(model.parameters(), optimizer_class, stage=1, **kwargs)
        return wrapped, opt, opt.state_bytes
    if strategy == "ZeRO-2":
        opt = ZeroOptimizer(model.parameters(), optimizer_class, stage=2, **kwargs)
        return model, opt, opt.state_bytes
    shard_model(model, list(model.blocks), MixedPrecisionPolicy(reduce_dtype=torch.float32))
    opt = optimizer_class(model.parameters(), **kwargs)
    return model, opt, lambda: local_state_bytes(opt)


def local_state_bytes(opt) -> int:
    total = 0
    for state in opt.state.values():
        for value in state.values():
            local = value.to_local() if hasattr(value, "to_local") else value
            total += local.nbytes if local.dim() > 0 else 0
    return total


def time_steps(model, opt, steps: int) -> float:
    """Median over steps of the slowest rank's seconds per step (one warm-up step first)."""
    times = []
    for i in range(steps + 1):
        dist.barrier()
        start = time.perf_counter()
        model().backward()
        opt.step()
        opt.zero_grad()
        elapsed = torch.tensor(time.perf_counter() - start)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i > 0:
            times.append(elapsed.item())
    return statistics.median(times)


def bench_rank(rank, world_size, model_name, steps):
    shapes = MODELS[model_name]()
    rows = []
    for opt_name in OPTIMIZERS:
        for strategy in STRATEGIES:
            model, opt, state_bytes = build(strategy, opt_name, shapes)
            seconds = time_steps(model, opt, steps)
            rows.append((strategy, opt_name, state_bytes(), seconds))
            del model, opt, state_bytes
            gc.collect()
    return rows


def forward_backward_alone(rank, world_size, model_name, steps):
    model = SyntheticModel(MODELS[model_name]())
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        model().backward()
        model.zero_grad()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_b16"], choices=sorted(MODELS))
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    os.environ.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(2**40))  # read by the ranks' glibc
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, gloo, 1 thread per rank\n")
    print("| model | N | strategy | optimizer | state MiB/rank | rank state / unsharded | s/step |")
    print("|---|---|---|---|---|---|---|")
    for model_name in args.models:
        fwd_bwd = run_distributed(forward_backward_alone, 1, model_name, args.steps, timeout=1800)[0]
        print(f"| {model_name} | 1 | fwd+bwd only | - | - | - | {fwd_bwd:.3f} |")
        unsharded: dict[str, int] = {}
        for world_size in args.world_sizes:
            rows = run_distributed(bench_rank, world_size, model_name, args.steps, timeout=1800)
            for i, (strategy, opt_name, state, seconds) in enumerate(rows[0]):
                per_rank = [r[i][2] for r in rows]
                if strategy == "DDP":
                    unsharded[opt_name] = state
                print(f"| {model_name} | {world_size} | {strategy} | {opt_name} | {max(per_rank) / 2**20:.1f} "
                      f"| {max(per_rank) / unsharded[opt_name]:.6f} | {seconds:.3f} |", flush=True)


if __name__ == "__main__":
    main()
