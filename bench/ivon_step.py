"""IVON's fused optimizer work per iteration vs the fused AdamW and VSGD steps, on ResNet-50
and ViT-B/16 parameter lists, plus optimizer state bytes per parameter.

IVON does two things per iteration: `sample` (draw the counter-based noise, write m_w + eps)
before the forward and `step` after the backward; the rows time both together and the
sample alone (with `restore`, which puts m_w back), in one process, median of steps. State
bytes count the tensors kept between steps; IVON additionally holds m_w and eps from `sample`
to `step` (8 B per fp32 parameter more, freed by `step`).

The engine rows run the trainer's native ZeRO-2 engine (`engine_for`, fused optimizers)
over N gloo ranks: an iteration is `WeightSampling(engine).sample(0)` (IVON: noise for this rank's shard and
the all-gather of m + eps; a no-op for AdamW), a trivial forward/backward (loss = sum(p * r):
the gradient reduce-scatter) and `engine.step()` (AdamW's includes the all-gather of the new
weights, IVON's leaves it to the next sample); the slowest rank's median seconds, and each
rank's optimizer state bytes per parameter.

    python bench/ivon_step.py [--models resnet50 vit_b16] [--steps 5] [--threads N] [--world-size 2]
    python bench/ivon_step.py --host   # host work per fused step, kernels replaced by no-ops

Each writes its tables to results/ (`--host`: results/ivon_step_host.md) under the machine it ran on.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_shapes import MODELS, numel  # noqa: E402
from results import cpu_model  # noqa: E402

from vsgd_dist import IVON, VSGD  # noqa: E402
from vsgd_dist.config import RunConfig  # noqa: E402
from vsgd_dist.engines.ownership import state_bytes  # noqa: E402
from vsgd_dist.engines.sampling import WeightSampling  # noqa: E402
from vsgd_dist.train.engine_setup import engine_for  # noqa: E402
from vsgd_dist.spawn import run_distributed  # noqa: E402


def time_round_robin(makers: dict, shapes, steps: int, warmup: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of `make(params).step()` per variant, each on its own fresh
    parameters of `shapes` whose `.grad` stays set, stepping in turn (round robin) so that load
    from other processes hits them alike; after `warmup` rounds (state, kernel loads). CPU
    seconds (all threads of this process) do not count time spent waiting for a core."""
    built = {}
    for name, make in makers.items():
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
        built[name] = make(params)
    times = {name: ([], []) for name in makers}
    for round_ in range(warmup + steps):
        for name, opt in built.items():
            wall, cpu = time.perf_counter(), time.process_time()
            opt.step()
            if round_ >= warmup:
                times[name][0].append(time.perf_counter() - wall)
                times[name][1].append(time.process_time() - cpu)
    return {name: (statistics.median(w), statistics.median(c)) for name, (w, c) in times.items()}


class _Iteration:
    """Presents IVON's per-iteration work as `step()` for `time_round_robin` (the gradient stays
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


class _LinearLoss(torch.nn.Module):
    """Parameters of the given shapes; forward() = sum(p * r), so grad(p) = r."""

    def __init__(self, shapes):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes)
        self.r = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]

    def forward(self):
        return sum((p * r).sum() for p, r in zip(self.weights, self.r))


def engine_rank(rank, world_size, model, steps):
    """(optimizer, slowest rank's median wall s/iteration, its median CPU s, this rank's state
    bytes) on ZeRO-2; the two engines iterate in turn, so that load hits them alike."""
    engines = {}
    for name, lr in (("adamw", 1e-3), ("ivon", 0.1)):
        cfg = RunConfig()
        cfg.optim.name, cfg.optim.fused, cfg.optim.weight_decay = name, True, 5e-5
        cfg.optim.ivon.ess, cfg.optim.ivon.hess_init = 1_281_167, 0.05
        engines[name] = engine_for(_LinearLoss(MODELS[model]()), cfg, lr)
    times = {name: ([], []) for name in engines}
    for round_ in range(steps + 1):  # the first loads the kernels
        for name, engine in engines.items():
            torch.distributed.barrier()
            start, cpu = time.perf_counter(), time.process_time()
            WeightSampling(engine).sample(0)
            engine.backward(engine.wrapped())
            engine.step()
            elapsed = torch.tensor([time.perf_counter() - start, time.process_time() - cpu])
            torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
            if round_:
                times[name][0].append(elapsed[0].item())
                times[name][1].append(elapsed[1].item())
    return [(name, statistics.median(times[name][0]), statistics.median(times[name][1]), state_bytes(engine.ownership()))
            for name, engine in engines.items()]


def state_bytes_per_param(optimizer, n: int) -> float:
    """Bytes of per-element tensors kept between steps (state, not the scalar step counters;
    fused IVON's sample buffers too) per parameter."""
    total = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
    buffers = getattr(getattr(optimizer, "fused_path", None), "buffers", {})
    return (total + sum(t.nbytes for kept in buffers.values() for t in kept)) / n


def host_work(model: str, steps: int = 300) -> dict[str, float]:
    """Median CPU ms of Python/host work per fused VSGD step and IVON sample + step on `model`'s
    tensor list (tiny tensors of the same count), every kernel launch replaced by a no-op: what
    a GPU step costs the host besides the launches."""
    from vsgd_dist.optim import ivon_cpu, vsgd_cpu

    launches = [(vsgd_cpu.CpuTable, "launch"), (ivon_cpu.CpuSampleTable, "launch"), (ivon_cpu.CpuStepTable, "launch")]
    saved = [getattr(cls, name) for cls, name in launches]
    for cls, name in launches:
        setattr(cls, name, lambda self, *args: None)
    try:
        shapes = [tuple(min(d, 2) for d in s) for s in MODELS[model]()]
        results = {}
        for name in ("VSGD fused step", "IVON fused sample + step"):
            params = [torch.zeros(s).requires_grad_() for s in shapes]
            for p in params:
                p.grad = torch.zeros_like(p)
            opt = VARIANTS[name](params)
            times = []
            for i in range(steps + 20):
                cpu = time.thread_time()
                opt.step()
                if i >= 20:
                    times.append(time.thread_time() - cpu)
            results[name] = statistics.median(times) * 1e3
        return results
    finally:
        for (cls, name), fn in zip(launches, saved):
            setattr(cls, name, fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--world-size", type=int, default=2, help="ranks of the ZeRO-2 engine rows (0: none)")
    parser.add_argument("--host", action="store_true", help="only the host work per fused step (no-op kernels)")
    args = parser.parse_args()
    if args.host:
        names = ("VSGD fused step", "IVON fused sample + step")
        print(f"torch {torch.__version__}, {cpu_model()}, load average {os.getloadavg()[0]:.1f} at start; "
              "host CPU ms per iteration, kernels replaced by no-ops (median of 300)\n")
        print(f"| model | tensors | {' | '.join(names)} |\n|---|---|---|---|")
        for model in args.models:
            ms = host_work(model)
            print(f"| {model} | {len(MODELS[model]())} | {' | '.join(f'{ms[name]:.3f}' for name in names)} |")
        return
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.steps} steps\n")
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| model | params | optimizer | ms | vs AdamW fused step | CPU ms | CPU vs AdamW | state B/param |")
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models:
        shapes = MODELS[model]()
        n = numel(shapes)
        built = {}

        def keep(name):
            def make(params):
                built[name] = VARIANTS[name](params)
                return built[name]
            return make

        results = time_round_robin({name: keep(name) for name in VARIANTS}, shapes, args.steps, args.warmup)
        base, base_cpu = results["AdamW fused step"]
        for name, (seconds, cpu) in results.items():
            optimizer = getattr(built[name], "optimizer", built[name])
            print(f"| {model} | {n / 1e6:.1f}M | {name} | {seconds * 1e3:.1f} | {seconds / base:.2f}x | "
                  f"{cpu * 1e3:.1f} | {cpu / base_cpu:.2f}x | {state_bytes_per_param(optimizer, n):.0f} |", flush=True)
        if args.world_size:
            rows = run_distributed(engine_rank, args.world_size, model, args.steps, timeout=3600)
            base, base_cpu = rows[0][0][1], rows[0][0][2]
            for i, (name, seconds, cpu, _) in enumerate(rows[0]):
                per_rank = max(r[i][3] for r in rows)
                label = {"adamw": "AdamW fused: fwd/bwd + step", "ivon": "IVON fused: sample + fwd/bwd + step"}[name]
                print(f"| {model} | {n / 1e6:.1f}M | ZeRO-2 x{args.world_size}: {label} | {seconds * 1e3:.1f} | "
                      f"{seconds / base:.2f}x | {cpu * 1e3:.1f} | {cpu / base_cpu:.2f}x | {per_rank / n:.2f} per rank |",
                      flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")

if __name__ == "__main__":
    from results import run_recorded

    sys.exit(run_recorded("ivon_step", main, variant="host" if "--host" in sys.argv else ""))
