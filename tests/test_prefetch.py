"""engine.prefetch_params (zero): a step (for IVON, a weight sample) leaves the parameters'
all-gathers running, each module's forward pre-hook waits for the buckets of its own
parameters, and training is bitwise what it is when every gather is waited for inside the
step (only the moment of the wait moves). Real gloo ranks, uneven bucket sizes."""
from __future__ import annotations

import pytest
import torch

from vsgd_dist.config import RunConfig
from vsgd_dist.engines.sampling import WeightSampling
from vsgd_dist.optim.ivon import IVONHparams
from vsgd_dist.spawn import run_distributed
from vsgd_dist.train.engine_setup import engine_for

pytestmark = pytest.mark.dist

STEPS = 5


def make_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(13, 7), torch.nn.LayerNorm(7), torch.nn.GELU(),
                               torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def build(stage: int, prefetch: bool, model=None, compile_model: bool = False, optimizer: str = "vsgd"):
    cfg = RunConfig()
    cfg.optim.name = optimizer
    if optimizer == "ivon":
        cfg.optim.ivon = IVONHparams(ess=50.0, hess_init=0.5, beta2=0.99)
    cfg.engine.name, cfg.engine.zero_stage, cfg.engine.prefetch_params = "zero", stage, prefetch
    cfg.engine.bucket_mb = 100 * 4 / 2**20  # ~100 fp32 elements: several buckets
    cfg.model.compile = compile_model
    return engine_for(model or make_model(), cfg, 0.05)


def train(rank: int, world_size: int, stage: int, prefetch: bool, optimizer: str = "vsgd"):
    engine = build(stage, prefetch, optimizer=optimizer)
    sampling = WeightSampling(engine)
    optimizer, losses, left_running = engine.optimizer, [], []
    data = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        x, y = torch.randn(4, 13, generator=data), torch.randn(4, 3, generator=data)
        if sampling.samples:
            sampling.sample(0)  # the weights m + eps: their gather is the one left running
            left_running.append(optimizer.gathers_running)
        loss = torch.nn.functional.mse_loss(engine.wrapped(x), y)
        assert not optimizer.gathers_running, "a forward left a gather running"
        engine.backward(loss)
        engine.step()
        if not sampling.samples:
            left_running.append(optimizer.gathers_running)
        losses.append(loss.item())
    sampling.mean_weights()  # what the trainer calls before anything else reads the weights
    assert not optimizer.gathers_running
    return losses, left_running, [p.detach().clone() for p in engine.model.parameters()], len(optimizer.buckets)


def prefetch_suite(rank, world_size):
    for stage, optimizer in ((1, "vsgd"), (2, "vsgd"), (2, "ivon")):
        plain, plain_running, plain_params, buckets = train(rank, world_size, stage, False, optimizer)
        fetched, fetched_running, fetched_params, _ = train(rank, world_size, stage, True, optimizer)
        assert buckets > 2 and plain_running == [0] * STEPS and fetched_running == [buckets] * STEPS, optimizer
        assert plain == fetched, (stage, optimizer, plain, fetched)
        assert all(torch.equal(a, b) for a, b in zip(plain_params, fetched_params)), (stage, optimizer)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [2, 3])
def test_prefetched_parameters_train_bitwise_like_waited_ones(world_size):
    run_distributed(prefetch_suite, world_size, timeout=110)


def refusals(rank, world_size):
    shared = torch.nn.Linear(3, 3)
    tied = torch.nn.Sequential(shared, torch.nn.Linear(3, 3))
    tied[1].weight = shared.weight
    with pytest.raises(ValueError, match=r"1.weight is also 0.weight \(tied weights\); set engine.prefetch_params=false"):
        build(2, True, tied)
    assert not build(2, True, compile_model=True).optimizer.prefetch


@pytest.mark.timeout(60)
def test_tied_weights_are_refused_and_compiled_models_wait_in_the_step():
    run_distributed(refusals, 2, timeout=50)
