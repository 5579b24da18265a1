"""The memory plan against what really happens: the optimizer state it counts is what the
engines allocate after a step on 1-3 CPU ranks (exact, bytes), its activation peak (measured
on fake tensors) is within 15% of the peak a real CPU forward/backward reaches, and a plan
that does not fit says what would."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from vsgd_dist.config import load_recipe
from vsgd_dist.memory_plan import (FP32, HEADROOM, _activation_peak, activation_peak, memory_plan, meta_model,
                                   plan_lines, state_elements_per_rank, state_tensors)
from vsgd_dist.spawn import run_distributed

pytestmark = pytest.mark.dist  # ranks, and forward/backward passes of real models
DEMO = "recipes/demo.yaml"
LAYOUTS = [("ddp", 2), ("zero", 1), ("zero", 2), ("fsdp2", 2)]
OPTIMIZERS = ["vsgd", "adamw", "ivon"]


def demo_cfg(engine: str, stage: int, optimizer: str):
    from vsgd_dist.optim import OPTIMIZERS as registry

    cfg = load_recipe(DEMO, [f"engine={engine}", f"engine.zero_stage={stage}", f"optimizer={optimizer}"])
    hparams = registry.get(optimizer).with_train_size(cfg.optim.hparams, 1000)  # IVON's ess, as the trainer does
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, **{optimizer: hparams}))


def allocated_state_bytes(rank: int, world_size: int) -> dict:
    """Each engine's own count of the state it holds after one real step, per layout."""
    from vsgd_dist.engines.ownership import state_bytes
    from vsgd_dist.engines.sampling import WeightSampling
    from vsgd_dist.models import build_model
    from vsgd_dist.train.engine_setup import engine_for

    held = {}
    for engine_name, stage in LAYOUTS:
        for optimizer in OPTIMIZERS:
            cfg = demo_cfg(engine_name, stage, optimizer)
            torch.manual_seed(0)
            model = build_model(cfg.model.name, 10, image_size=cfg.data.end_res)
            engine = engine_for(model, cfg, 0.01)
            WeightSampling(engine).sample(0)  # IVON's state exists from its first sample
            images = torch.randn(4, 3, cfg.data.end_res, cfg.data.end_res)
            engine.backward(torch.nn.functional.cross_entropy(engine.wrapped(images), torch.arange(4)))
            engine.step()
            held[(engine_name, stage, optimizer)] = state_bytes(engine.ownership())
    return held


@pytest.mark.dist
@pytest.mark.timeout(900)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_optimizer_state_is_what_the_engines_allocate(world_size):
    allocated = run_distributed(allocated_state_bytes, world_size, timeout=800)
    for rank, held in enumerate(allocated):
        for (engine, stage, optimizer), nbytes in held.items():
            cfg = demo_cfg(engine, stage, optimizer)
            shards = 1 if engine == "ddp" else world_size
            planned = state_tensors(cfg) * state_elements_per_rank(cfg, meta_model(cfg, 10), shards, rank) * FP32
            assert planned == nbytes, (engine, stage, optimizer, rank, planned, nbytes)
    assert 2 * allocated[0][("zero", 2, "vsgd")] == 3 * allocated[0][("zero", 2, "adamw")]


def measured_cpu_peak(cfg, batch: int) -> int:
    """Activations and temporaries at the peak of a real forward/backward on this CPU."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    from vsgd_dist.models import build_model

    model = build_model(cfg.model.name, 10, image_size=cfg.data.end_res)
    images = torch.randn(batch, 3, cfg.data.end_res, cfg.data.end_res)
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(images), torch.zeros(batch, dtype=torch.long))
        loss.backward()
    by_kind = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return int(by_kind[_MemRefType.ACT] + by_kind[_MemRefType.TEMP])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("model,resolution,batch,precision", [("resnet_tiny", 32, 64, "fp32"),
                                                               ("resnet18", 64, 8, "bf16")])
def test_activation_estimate_is_within_15_percent_of_a_measured_cpu_peak(model, resolution, batch, precision):
    cfg = load_recipe(DEMO, [f"model={model}", f"data.end_res={resolution}", f"data.start_res={resolution}",
                             f"data.val_res={resolution}", f"train.precision={precision}"])
    estimate, measured = activation_peak(cfg, 10, batch), measured_cpu_peak(cfg, batch)
    assert measured > 0 and abs(estimate - measured) <= 0.15 * measured, (estimate, measured)
    assert _activation_peak.cache_info().currsize >= 1


@pytest.mark.timeout(600)
def test_a_plan_that_does_not_fit_says_what_would():
    cfg = load_recipe(DEMO, ["engine=ddp"])
    plan = memory_plan(cfg, 2, 10)
    assert plan.optimizer_state == 3 * plan.weights  # VSGD's 3 fp32 tensors per fp32 weight, whole under DDP
    halved = int((plan.total - plan.activations / 2) / HEADROOM) + 1  # fits once the micro-batch halves
    lines = plan_lines(cfg, 2, gpu_memory_bytes=halved, num_classes=10)
    assert lines[0].startswith("memory plan per GPU: resnet_tiny, vsgd on ddp, 2 GPU(s)")
    assert any("optimizer state" in ln and "3 fp32 tensor(s) per weight" in ln for ln in lines)
    assert lines[-1].startswith("does not fit: ") and "train.accum_steps=2 (16 images per micro-batch)" in lines[-1], \
        lines[-1]
    assert plan_lines(cfg, 2, gpu_memory_bytes=2**40, num_classes=10)[-1].startswith("fits: ")
