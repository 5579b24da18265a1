"""IVON's fused path on CUDA (compiled sample and step) against its per-tensor path, and
without host syncs.

Tolerance: both draw z with the same integer Philox; Inductor's log, cos and sqrt and its
multiply-add contraction may round differently from eager CUDA ops, so after 20 steps the
parameters are held to rtol 1e-5 (as tests/test_ivon.py holds the fused CPU path), the
Hessians to 5e-6.
"""
from __future__ import annotations

import pytest
import torch

from vsgd_dist import IVON

SHAPES = [(64, 3, 7, 7), (256,), (1000, 33), (1,)]
HP = dict(lr=0.05, ess=1000.0, hess_init=0.5, weight_decay=1e-4, clip_radius=1.0)
STEPS = 20


def train(fused: bool):
    """IVON on one flat master of all SHAPES, described as two runs in reverse order (as a
    ZeRO bucket fills), as a many-piece shard has them."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    total = sum(torch.Size(s).numel() for s in SHAPES)
    master = torch.randn(total, device="cuda", generator=gen).requires_grad_()
    opt = IVON([master], **HP, fused=fused, foreach=False)
    half = total // 2
    opt.set_global_offset(master, [(half, total - half), (0, half)])
    grads = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(STEPS):
        opt.sample(0)
        master.grad = master.detach() * 0.1 + torch.randn(total, device="cuda", generator=grads) * 1e-2
        opt.step()
    torch.cuda.synchronize()
    return master, opt


def test_fused_ivon_matches_the_per_tensor_path():
    fused, fused_opt = train(fused=True)
    plain, plain_opt = train(fused=False)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_opt.state[fused]["h"], plain_opt.state[plain]["h"], rtol=5e-6, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "per-tensor"])
def test_an_ivon_sample_and_step_never_make_the_host_wait_for_the_gpu(fused):
    """Counters, run tables and scalars reach the device from pinned memory, without a wait."""
    master, opt = train(fused=fused)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.sample(0)
            master.grad = master.detach() * 0.1
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
