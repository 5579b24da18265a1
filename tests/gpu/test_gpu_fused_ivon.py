"""IVON's fused path on CUDA (Triton sample and step kernels, one launch each) against its
per-tensor path, against the CPU kernel, and without host syncs.

Tolerance: both paths draw z with the same integer Philox and the same float32 polynomials;
the eager path's sqrt and torch's fused multiply-adds may round differently from the kernel's
IEEE operations, so after 20 steps the parameters are held to rtol 1e-5 (as tests/test_ivon.py
holds the fused CPU path), the Hessians to 5e-6. The Triton kernels launch without fp fusion,
so their noise and samples should be the CPU kernel's bits (Triton's interpreter gives them).
"""
from __future__ import annotations

import pytest
import torch

from vsgd_dist import IVON
from vsgd_dist.optim import ivon_cpu

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


def test_fused_ivon_cuda_sample_is_the_cpu_kernels_sample():
    """The first weight sample drawn on the GPU, copied back, equals the C++ kernel's on the
    same tensors: the noise is the same function of (seed, step, sample, index) on both."""
    gen = torch.Generator().manual_seed(0)
    total = sum(torch.Size(s).numel() for s in SHAPES)
    host = torch.randn(total, generator=gen)
    cpu_master, gpu_master = host.clone().requires_grad_(), host.cuda().requires_grad_()
    for master in (cpu_master, gpu_master):
        opt = IVON([master], **HP, fused=True)
        opt.set_global_offset(master, [(total // 2, total - total // 2), (0, total // 2)])
        opt.sample(0)
    assert ivon_cpu.library()  # the CPU side ran its kernel, not the unfused path
    assert torch.equal(gpu_master.detach().cpu(), cpu_master.detach())


def test_fused_ivon_per_tensor_list_is_one_launch_per_step():
    """A list of tensors (DDP's case) steps through the group plan: its kept Triton tables."""
    params = [torch.randn(s, device="cuda").requires_grad_() for s in SHAPES]
    opt = IVON(params, **HP, fused=True)
    for _ in range(3):
        opt.sample(0)
        for p in params:
            p.grad = p.detach() * 0.1
        opt.step()
    plan = opt.fused_path.plans[0]  # private: which kernels ran is the point
    assert type(plan.sample_table).__name__ == "TritonSampleTable"
    assert type(plan.step_table).__name__ == "TritonStepTable" and plan.t == 3
