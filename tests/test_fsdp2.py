"""VSGD and AdamW on FSDP2 (DTensor parameters) against the unsharded run, on gloo ranks.

Tolerances: the optimizer-level check feeds each shard the exact reference gradient, so
params must match BITWISE (elementwise update, same values). End to end, FSDP2 averages the
per-rank gradients with a reduce-scatter, which rounds differently from one full-batch
backward (~1e-7 relative); after 20 Adam-like steps rtol/atol 1e-4. Diagnostics are summed
over shards in another order: rtol 1e-5.
"""
from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import distribute_tensor

from vsgd_dist.optim.vsgd import VSGD, diagnostic_sums
from vsgd_dist.sharding.fsdp2 import diagnostics, shard_model, sharded_optimizer
from full_batch import train_side_by_side

from vsgd_dist.spawn import run_distributed

STEPS = 20
OPTIMIZERS = {"vsgd": (VSGD, dict(lr=0.05, weight_decay=0.1)),
              "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1))}


def make_model() -> torch.nn.Sequential:
    """Odd shapes (dim 0 of 7, 5, 3): uneven shards, empty ones at 4 ranks."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(13, 7), torch.nn.LayerNorm(7), torch.nn.GELU(),
                               torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def blocks(model):
    return [m for m in model if any(True for _ in m.parameters())]


def check_optimizer_bitwise(opt_name):
    optimizer_class, kwargs = OPTIMIZERS[opt_name]
    reference, model = make_model(), make_model()
    shard_model(model, blocks(model))
    ref_opt = optimizer_class(reference.parameters(), **kwargs)
    opt = sharded_optimizer(model.parameters(), optimizer_class, **kwargs)
    g = torch.Generator().manual_seed(3)
    for _ in range(STEPS):
        for p, ref in zip(model.parameters(), reference.parameters()):
            ref.grad = torch.randn(ref.shape, generator=g)
            p.grad = distribute_tensor(ref.grad, p.device_mesh, p.placements)
        opt.step()
        ref_opt.step()
    for p, ref in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.full_tensor(), ref), opt_name
    return model, opt, reference, ref_opt


def check_diagnostics(model, opt, reference, ref_opt):
    layer_of = {name: name.split(".")[0] for name, _ in reference.named_parameters()}
    sharded = diagnostics(opt, model.named_parameters(), layer_of)
    group = ref_opt.param_groups[0]
    for layer in sharded:
        row = sum(diagnostic_sums(ref_opt.state[p]["mug"], ref_opt.state[p]["bg"], ref_opt.state[p]["bhg"],
                                  lr=group["lr"], eps=group["eps"], ps=group["ps"], ghattg=group["ghattg"]).double()
                  for n, p in reference.named_parameters() if layer_of[n] == layer)
        expected = torch.tensor([row[0].item()] + (row[1:] / row[0]).tolist(), dtype=torch.float64)
        got = torch.tensor([sharded[layer][k] for k in ("count", "snr", "posterior_std", "implied_beta1", "effective_step")],
                           dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def check_end_to_end(rank, world_size, opt_name):
    """Each rank trains on its slice of a global batch of 12; equals full-batch training."""
    optimizer_class, kwargs = OPTIMIZERS[opt_name]
    reference, model = make_model(), make_model()
    shard_model(model, blocks(model))
    ref_opt = optimizer_class(reference.parameters(), **kwargs)
    opt = sharded_optimizer(model.parameters(), optimizer_class, **kwargs)
    train_side_by_side(model, opt, reference, ref_opt, rank, world_size, STEPS)
    for p, ref in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.full_tensor(), ref, rtol=1e-4, atol=1e-4)


def fsdp2_suite(rank, world_size):
    for opt_name in OPTIMIZERS:
        model, opt, reference, ref_opt = check_optimizer_bitwise(opt_name)
        if opt_name == "vsgd":
            check_diagnostics(model, opt, reference, ref_opt)
        check_end_to_end(rank, world_size, opt_name)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_fsdp2_matches_unsharded(world_size):
    run_distributed(fsdp2_suite, world_size, timeout=80)
