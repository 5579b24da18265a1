"""The engines and the host-value helpers on NCCL: one rank per GPU (at most 4), or one rank
on a one-GPU machine, in a "cuda:nccl,cpu:gloo" group made by init_process_group_from_env.

Tolerances as on CPU (tests/test_ddp_fsdp2.py): every engine averages per-rank gradients,
which rounds differently from one full-batch backward (~1e-7 relative), so after 20 Adam-like
steps the weights equal the single-GPU run to rtol/atol 1e-4. TF32 is off (fast_kernels=False)
so that matmuls are IEEE fp32 on both sides.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from gpu_helpers import gpu_ranks
from vsgd_dist.config import RunConfig
from vsgd_dist.distributed import (all_reduce, backend_for, gather_host_objects, gather_host_values, pick_device,
                                   reduce_host_values, set_kernel_options)
from vsgd_dist.engines.sampling import WeightSampling
from vsgd_dist.train.engine_setup import engine_for, engine_setup
from vsgd_dist.optim import named_param_groups
from vsgd_dist.spawn import run_distributed

STEPS, BATCH = 20, 24
ENGINES = [("ddp", 2), ("zero", 1), ("zero", 2), ("fsdp2", 2)]


def make_model(device) -> torch.nn.Sequential:
    """Odd shapes: uneven shards, empty ones at 4 ranks."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(13, 7), torch.nn.LayerNorm(7), torch.nn.GELU(),
                               torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(device)


def config(engine: str, stage: int, optimizer: str, fused: bool) -> RunConfig:
    cfg = RunConfig()
    cfg.engine.name, cfg.engine.zero_stage = engine, stage
    cfg.optim.name, cfg.optim.weight_decay, cfg.optim.fused = optimizer, 0.1, fused
    return cfg


def engines_match_one_gpu(rank: int, world: int) -> list[str]:
    device = pick_device()
    assert device.type == "cuda" and backend_for(device) == "cuda:nccl,cpu:gloo"
    set_kernel_options(False)
    checked = []
    for engine_name, stage in ENGINES:
        for optimizer, fused in (("vsgd", True), ("vsgd", False), ("adamw", True)):
            cfg = config(engine_name, stage, optimizer, fused)
            engine = engine_for(make_model(device), cfg, 0.01)
            reference = make_model(device)
            setup = engine_setup(cfg, 0.01)
            ref_opt = setup.optimizer.optimizer_class(named_param_groups(reference, 0.1), **setup.optimizer_kwargs())
            g = torch.Generator(device=device).manual_seed(7)
            per_rank = BATCH // world
            for _ in range(STEPS):
                x = torch.randn(BATCH, 13, generator=g, device=device)
                y = torch.randn(BATCH, 3, generator=g, device=device)
                mine = slice(rank * per_rank, (rank + 1) * per_rank)
                engine.backward(torch.nn.functional.mse_loss(engine.wrapped(x[mine]), y[mine]))
                engine.step()
                torch.nn.functional.mse_loss(reference(x[:per_rank * world]), y[:per_rank * world]).backward()
                ref_opt.step()
                ref_opt.zero_grad()
            WeightSampling(engine).mean_weights()
            for p, ref in zip(engine.model.parameters(), reference.parameters()):
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                assert full.is_cuda
                torch.testing.assert_close(full, ref, rtol=1e-4, atol=1e-4)
            checked.append(f"{engine_name}{stage}-{optimizer}{'-fused' if fused else ''}")
    return checked


@pytest.mark.timeout(600)
def test_engines_on_nccl_match_the_single_gpu_run():
    world = gpu_ranks(4)
    results = run_distributed(engines_match_one_gpu, world, timeout=580)
    assert len(results[0]) == 3 * len(ENGINES)


def host_values_over_nccl(rank: int, world: int) -> dict:
    """Host numbers travel on the gloo side, device tensors on NCCL; both in one group."""
    device = pick_device()
    summed = reduce_host_values([1.0, float(rank)])
    biggest = reduce_host_values([float(rank)], op="max")
    gathered = gather_host_values(rank * 10.0)
    objects = gather_host_objects({"rank": rank})
    on_device = all_reduce(torch.ones(3, device=device, dtype=torch.float64) * (rank + 1))
    return {"summed": summed, "max": biggest, "gathered": gathered, "objects": objects,
            "device": on_device.device.type, "device_sum": on_device.tolist()}


@pytest.mark.timeout(300)
def test_host_value_helpers_and_device_all_reduce_on_a_nccl_group():
    world = gpu_ranks(4)
    for result in run_distributed(host_values_over_nccl, world, timeout=280):
        assert result["summed"] == [world, sum(range(world))] and result["max"] == [world - 1]
        assert result["gathered"] == [10.0 * r for r in range(world)]
        assert result["objects"] == [{"rank": r} for r in range(world)]
        assert result["device"] == "cuda" and result["device_sum"] == [world * (world + 1) / 2] * 3


def step_without_host_sync(rank: int, world: int) -> list[str]:
    """After two warm-up steps, a training step (forward, backward, engine.step) with the
    sync debug mode set to "error": any .item(), blocking copy or stream sync raises, with
    its stack. Models with BatchNorm and channels_last, bf16 autocast, fused optimizers."""
    from vsgd_dist.models import build_model

    device = pick_device()
    checked = []
    for engine_name, stage in ENGINES:
        for optimizer in ("vsgd", "adamw"):
            cfg = config(engine_name, stage, optimizer, fused=True)
            cfg.train = dataclasses.replace(cfg.train, precision="bf16", grad_clip=1.0)
            torch.manual_seed(0)
            model = build_model("resnet_tiny", 10).to(device).to(memory_format=torch.channels_last)
            engine = engine_for(model, cfg, 0.01)
            x = torch.randn(8, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (8,), device=device)

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = torch.nn.functional.cross_entropy(engine.wrapped(x), y)
                engine.backward(loss)
                return engine.step()

            for _ in range(2):
                step()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                step()
            except RuntimeError as e:
                raise AssertionError(f"{engine_name}{stage}-{optimizer}: a step synchronizes: {e}") from e
            finally:
                torch.cuda.set_sync_debug_mode("default")
            checked.append(f"{engine_name}{stage}-{optimizer}")
    return checked


@pytest.mark.timeout(600)
def test_a_training_step_never_makes_the_host_wait_on_any_engine():
    world = gpu_ranks(2)
    assert len(run_distributed(step_without_host_sync, world, timeout=580)[0]) == 2 * len(ENGINES)


def fsdp2_precisions(rank: int, world: int) -> dict[str, list[float]]:
    """10 steps on a fixed batch with each FSDP2 policy, under bf16 autocast; the losses."""
    from vsgd_dist.models import build_model

    device = pick_device()
    set_kernel_options(False)
    losses = {}
    for precision in ("bf16", "fp32"):
        cfg = config("fsdp2", 2, "vsgd", fused=True)
        cfg.train = dataclasses.replace(cfg.train, precision=precision)
        torch.manual_seed(0)
        model = build_model("resnet_tiny", 10).to(device).to(memory_format=torch.channels_last)
        engine = engine_for(model, cfg, 0.01)
        g = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(16, 3, 32, 32, generator=g, device=device).to(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (16,), generator=g, device=device)
        per_rank = 16 // world
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        curve = []
        for _ in range(10):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(engine.wrapped(x[mine]), y[mine])
            engine.backward(loss)
            engine.step()
            curve.append(all_reduce(loss.detach().float().clone()) / world)
        losses[precision] = torch.stack(curve).tolist()
    return losses


@pytest.mark.timeout(600)
def test_fsdp2_bf16_policy_trains_like_fp32_policy_under_autocast():
    """On CPU the two are bitwise equal (tests/test_gpu_lane.py); on GPU the bf16 weights may
    meet other kernels, so: the loss falls, and the curves agree to 2%."""
    losses = run_distributed(fsdp2_precisions, gpu_ranks(2), timeout=580)[0]
    assert losses["bf16"][-1] < 0.7 * losses["bf16"][0]
    torch.testing.assert_close(torch.tensor(losses["bf16"]), torch.tensor(losses["fp32"]), rtol=0.02, atol=0)
