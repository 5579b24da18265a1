"""The FSDP2 engine (DTensor parameters) and the DDP engine, with VSGD and AdamW, against the
unsharded run, on gloo ranks. (The ZeRO engine's optimizer is tested in test_zero.py.)

Tolerances: the optimizer-level check feeds each FSDP2 shard the exact reference gradient,
so params must match BITWISE (elementwise update, same values). End to end, both engines
average per-rank gradients (FSDP2 reduce-scatter, DDP bucketed all-reduce), which rounds
differently from one full-batch backward (~1e-7 relative); after 20 Adam-like steps
rtol/atol 1e-4. Diagnostics are summed over shards in another order: rtol 1e-5.
"""
from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import distribute_tensor

from full_batch import train_side_by_side
from vsgd_dist.config import RunConfig
from vsgd_dist.engines.ownership import state_pieces
from vsgd_dist.optim import named_param_groups
from vsgd_dist.optim.diagnostics import reduced_diagnostics
from vsgd_dist.optim.vsgd_diagnostics import DIAGNOSTICS, diagnostic_sums
from vsgd_dist.spawn import run_distributed
from vsgd_dist.train.engine_setup import engine_for, engine_setup

pytestmark = pytest.mark.dist

STEPS = 20
LR = {"vsgd": 0.05, "adamw": 0.01}
WEIGHT_DECAY = 0.1


def make_model() -> torch.nn.Sequential:
    """Odd shapes (dim 0 of 7, 5, 3): uneven shards, empty ones at 4 ranks."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(13, 7), torch.nn.LayerNorm(7), torch.nn.GELU(),
                               torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def engine_and_reference(opt_name: str, engine_name: str = "fsdp2"):
    """An engine over one model and the same optimizer, unsharded, over an identical one.
    VSGD runs fused, as the recipes run it (its kernel gives the same bits wherever a tensor
    is cut); AdamW unfused: torch's fused AdamW rounds differently (1 ulp) where FSDP2 cuts."""
    cfg = RunConfig()
    cfg.optim.name, cfg.optim.weight_decay, cfg.engine.name = opt_name, WEIGHT_DECAY, engine_name
    cfg.optim.fused = None if opt_name == "vsgd" else False
    engine = engine_for(make_model(), cfg, LR[opt_name])
    reference = make_model()
    setup = engine_setup(cfg, LR[opt_name])
    ref_opt = setup.optimizer.optimizer_class(named_param_groups(reference, WEIGHT_DECAY), **setup.optimizer_kwargs())
    return engine, reference, ref_opt


def check_optimizer_bitwise(opt_name):
    engine, reference, ref_opt = engine_and_reference(opt_name)
    g = torch.Generator().manual_seed(3)
    for _ in range(STEPS):
        for p, ref in zip(engine.model.parameters(), reference.parameters()):
            ref.grad = torch.randn(ref.shape, generator=g)
            p.grad = distribute_tensor(ref.grad, p.device_mesh, p.placements)
        engine.step()
        ref_opt.step()
    for p, ref in zip(engine.model.parameters(), reference.parameters()):
        assert torch.equal(p.full_tensor(), ref), opt_name
    return engine, reference, ref_opt


def check_diagnostics(engine, reference, ref_opt):
    layer_of = {name: name.split(".")[0] for name, _ in reference.named_parameters()}
    pieces = state_pieces(engine.ownership(), DIAGNOSTICS.state_keys)
    sharded, _ = reduced_diagnostics(DIAGNOSTICS, pieces, layer_of.get, reduce=True, device=torch.device("cpu"))
    hp = {"lr": LR["vsgd"], **{k: ref_opt.param_groups[0][k] for k in ("eps", "ps", "ghattg")}}
    for layer in sharded:
        row = sum(diagnostic_sums(ref_opt.state[p]["mug"], ref_opt.state[p]["bg"], ref_opt.state[p]["bhg"],
                                  **hp).double()
                  for n, p in reference.named_parameters() if layer_of[n] == layer)
        expected = torch.tensor([row[0].item()] + (row[1:] / row[0]).tolist(), dtype=torch.float64)
        got = torch.tensor([sharded[layer][k] for k in ("count", "snr", "posterior_std", "implied_beta1",
                                                         "effective_step")], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def check_end_to_end(rank, world_size, opt_name, engine_name):
    """Each rank trains on its slice of a global batch of 12; equals full-batch training."""
    engine, reference, ref_opt = engine_and_reference(opt_name, engine_name)
    train_side_by_side(engine.wrapped, None, reference, ref_opt, rank, world_size, STEPS, engine=engine)
    for p, ref in zip(engine.model.parameters(), reference.parameters()):
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        torch.testing.assert_close(full, ref, rtol=1e-4, atol=1e-4)


def engines_suite(rank, world_size):
    for opt_name in LR:
        engine, reference, ref_opt = check_optimizer_bitwise(opt_name)
        if opt_name == "vsgd":
            check_diagnostics(engine, reference, ref_opt)
        for engine_name in ("fsdp2", "ddp"):
            check_end_to_end(rank, world_size, opt_name, engine_name)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_fsdp2_and_ddp_engines_match_unsharded(world_size):
    run_distributed(engines_suite, world_size, timeout=110)
