"""Time per training step and per-rank memory of the engines, VSGD against AdamW, with the
recipe defaults.

On N gloo processes (CPU), for ResNet-50 and ViT-B/16 parameter lists (real shapes from
`model_shapes`). Each strategy runs in fresh processes with TWO engines over two copies of a
synthetic model, one with VSGD and one with AdamW, both built by `build_engine` from a default
RunConfig (fused optimizers, ZeRO stage 2, 25 MiB buckets), stepping in turn, so that load on
the machine hits both alike. A step is the trainer's: `engine.backward(loss)` (gradient sync
in hooks) and `engine.step()` (global norm, optimizer step, parameter gather); the forward is
trivial (loss = sum(p * r), so grad(p) = r). Median over steps of the slowest rank.

Strategies: DDP, native ZeRO-1 (on DDP) and ZeRO-2 (`ZeroOptimizer`), FSDP2, DeepSpeed ZeRO-1
and ZeRO-2 (the trainer's engines), and torch's ZeroRedundancyOptimizer on DDP with the same
optimizer arguments: native ZeRO-1's peer, measured in the same processes (four engines
stepping in turn).

Memory per rank, MiB held between steps (each distinct storage once): params (the model's
parameters, local shards for FSDP2), grads (DDP's bucket buffers, one copy of every
gradient; ZeroOptimizer's gradient shards; DeepSpeed's gradient partition and bucket buffers;
FSDP2 frees its sharded gradients with zero_grad), masters (fp32 weights kept apart from
the parameters) and optimizer state. Transients inside a step (DDP's `.grad` next to its
buckets, ZeRO-2's bucket inputs until the step, FSDP2's unsharded layers) are not in it.

The ranks start with the caching-allocator settings (`vsgd_dist.spawn` applies
`vsgd_dist.allocator`). With N above the core count the ranks share cores: such timings show
overheads, not scaling.

    python bench/sharded_step.py [--models resnet50 vit_b16] [--world-sizes 2] [--steps 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_shapes import MODELS, numel  # noqa: E402

from vsgd_dist.config import RunConfig  # noqa: E402
from vsgd_dist.engines.ownership import state_bytes  # noqa: E402
from vsgd_dist.train.engine_setup import engine_for  # noqa: E402
from vsgd_dist.distributed import local_tensor  # noqa: E402
from vsgd_dist.optim import OPTIMIZERS, named_param_groups  # noqa: E402
from vsgd_dist.spawn import run_distributed  # noqa: E402

STRATEGIES = {  # label: (engine name, ZeRO stage)
    "DDP": ("ddp", 0), "native ZeRO-1": ("zero", 1), "torch ZeroRedundancyOptimizer": ("torch_zero", 1),
    "native ZeRO-2": ("zero", 2), "FSDP2": ("fsdp2", 0), "DeepSpeed ZeRO-1": ("deepspeed", 1),
    "DeepSpeed ZeRO-2": ("deepspeed", 2)}
PEERS = {"native ZeRO-1": "torch ZeroRedundancyOptimizer"}
"""Strategies measured in the same processes, stepping in turn: their ratio is the target."""
OPTIMIZER_NAMES = ("vsgd", "adamw")
LR, WEIGHT_DECAY = 1e-3, 0.05


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


def time_steps(model, opt, steps: int) -> float:
    """Median over steps of the slowest rank's seconds per step (one warm-up step first)."""
    times = []
    for i in range(steps + 1):
        dist.barrier()
        start = time.perf_counter()
        model().backward()
        opt.step()
        opt.zero_grad()
        if i > 0:
            times.append(slowest_rank(time.perf_counter() - start))
    return statistics.median(times)


def slowest_rank(seconds: float) -> float:
    t = torch.tensor(seconds)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def bench_config(optimizer: str, engine: str, stage: int) -> RunConfig:
    cfg = RunConfig()
    cfg.optim.name, cfg.optim.weight_decay = optimizer, WEIGHT_DECAY
    cfg.engine.name = engine
    if stage:
        cfg.engine.zero_stage = stage
    cfg.model.channels_last = False
    return cfg


class TorchZeroEngine:
    """torch's ZeroRedundancyOptimizer behind DDP, stepped as the trainer steps an engine."""

    def __init__(self, model, cfg):
        entry = OPTIMIZERS.get(cfg.optim.name)
        self.model = model
        self.wrapped = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=cfg.engine.bucket_mb)
        groups = [{k: v for k, v in g.items() if k != "param_names"} for g in named_param_groups(model, WEIGHT_DECAY)]
        self.optimizer = ZeroRedundancyOptimizer(
            groups, entry.optimizer_class, **entry.kwargs(cfg.optim.hparams, LR, WEIGHT_DECAY, cfg.optim.fused))

    def backward(self, loss):
        loss.backward()

    def step(self):
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def state_bytes(self):
        return sum(v.nbytes for s in self.optimizer.optim.state.values() for v in s.values()
                   if torch.is_tensor(v) and v.dim() > 0)


def build(optimizer: str, shapes, engine: str, stage: int):
    cfg = bench_config(optimizer, engine, stage)
    if engine == "torch_zero":
        return TorchZeroEngine(SyntheticModel(shapes), cfg)
    return engine_for(SyntheticModel(shapes), cfg, LR)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    storages = {}
    for t in tensors:
        if torch.is_tensor(t):
            storage = local_tensor(t).untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def memory_parts(engine, engine_name: str, stage: int) -> dict[str, int]:
    """Bytes this rank holds between steps, by kind (see the module docstring)."""
    params = list(engine.model.parameters())
    param_bytes = storage_bytes(params)
    grads = masters = 0
    if engine_name in ("ddp", "torch_zero") or (engine_name == "zero" and stage == 1):
        grads += sum(p.numel() * p.element_size() for p in params)  # DDP's bucket buffers
    if engine_name == "zero":
        opt = engine.optimizer
        grads += storage_bytes(opt._grad_shards)
        masters = storage_bytes(m for m in opt.masters if m.untyped_storage().data_ptr() not in
                                {b.untyped_storage().data_ptr() for b in opt._param_buffers})
    if engine_name == "deepspeed":
        zero = engine.zero
        held = [getattr(zero, name, None) for name in ("grads_in_partition", "ipg_buffer")]
        grads = storage_bytes(t for h in held if h is not None for t in (h if isinstance(h, (list, tuple)) else [h]))
        masters = storage_bytes(zero.single_partition_of_fp32_groups)
    return {"params": param_bytes, "grads": grads, "masters": masters, "state": engine.state_bytes() if isinstance(engine, TorchZeroEngine) else state_bytes(engine.ownership())}


def bench_rank(rank, world_size, model_name, labels, steps):
    """The VSGD and AdamW engines of each strategy in `labels`, all stepping in turn."""
    shapes = MODELS[model_name]()
    engines = {(label, name): build(name, shapes, *STRATEGIES[label]) for label in labels for name in OPTIMIZER_NAMES}
    times: dict[tuple, list[float]] = {key: [] for key in engines}
    for i in range(steps + 1):
        for key, engine in engines.items():
            dist.barrier()
            start = time.perf_counter()
            engine.backward(engine.wrapped())
            engine.step()
            elapsed = slowest_rank(time.perf_counter() - start)
            if i > 0:  # the first step allocates state (and loads the fused kernel)
                times[key].append(elapsed)
    return {key: (statistics.median(times[key]), memory_parts(engine, *STRATEGIES[key[0]]))
            for key, engine in engines.items()}


def process_groups(labels: list[str]) -> list[list[str]]:
    """The strategies to measure in one set of processes each: a strategy with a peer
    (`PEERS`) together with it."""
    with_peer = {PEERS[label] for label in labels if label in PEERS}
    return [[label, PEERS[label]] if label in PEERS else [label] for label in labels if label not in with_peer]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_b16"], choices=sorted(MODELS))
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[2])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, gloo, 1 thread per rank, median of "
          f"{args.steps} steps; load average {os.getloadavg()[0]:.1f} at start\n")
    print("| model | N | strategy | AdamW s/step | VSGD s/step | VSGD / AdamW |")
    print("|---|---|---|---|---|---|")
    memory = []
    runs = process_groups(args.strategies)
    for model_name in args.models:
        for world_size in args.world_sizes:
            for labels in runs:
                result = run_distributed(bench_rank, world_size, model_name, labels, args.steps, timeout=3600)
                for label in labels:
                    (vsgd, _), (adamw, _) = result[0][(label, "vsgd")], result[0][(label, "adamw")]
                    print(f"| {model_name} | {world_size} | {label} | {adamw:.3f} | {vsgd:.3f} | "
                          f"{vsgd / adamw:.2f}x |", flush=True)
                    for name in OPTIMIZER_NAMES:
                        per_rank = [r[(label, name)][1] for r in result]
                        memory.append((model_name, world_size, label, name,
                                       {k: max(m[k] for m in per_rank) for k in per_rank[0]}))
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end\n")
    print("Memory per rank held between steps, MiB (the largest rank):\n")
    print("| model | N | strategy | optimizer | params | grads | masters | optimizer state | total |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model_name, world_size, label, name, parts in memory:
        mib = {k: v / 2**20 for k, v in parts.items()}
        print(f"| {model_name} | {world_size} | {label} | {name} | {mib['params']:.1f} | {mib['grads']:.1f} "
              f"| {mib['masters']:.1f} | {mib['state']:.1f} | {sum(mib.values()):.1f} |")


if __name__ == "__main__":
    from results import run_recorded

    sys.exit(run_recorded("sharded_step", main))
