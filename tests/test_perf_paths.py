"""The fast paths keep the numbers: VSGD's and IVON's fused kernels and their fallbacks, the
chunked unfused path, the rank processes' allocator settings.

Tolerances: the C++ kernel and the Triton kernel (run here by Triton's interpreter) are the
same sequence of fp32 operations on the same fp32 scalars; on a GPU Triton may contract a
multiply-add, so they are held to 1e-6 relative. Chunking the unfused path cuts elementwise ops at other places: bitwise.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import subprocess
import sys

import pytest
import torch

from launch.clusters import ClusterProfile
from launch.slurm import REPO, build_spec
from vsgd_dist import IVON, VSGD, allocator
from vsgd_dist.optim import ivon_cpu, ivon_fused, noise, vsgd_cpu, vsgd_fused, vsgd_update
from vsgd_dist.spawn import run_distributed

BIG_SHAPES = [(300, 301), (200_001,), (5,), (64, 40, 7, 7)]  # all but one larger than a chunk


def make_params(shapes, dtype=torch.float32, channels_last=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    if channels_last:
        params = [p.to(memory_format=torch.channels_last) if p.dim() == 4 else p for p in params]
    return [p.requires_grad_() for p in params]


def run(opt_kwargs, steps=6, dtype=torch.float32, channels_last=False, contiguous_grads=False,
        shapes=BIG_SHAPES, lrs=None):
    params = make_params(shapes, dtype, channels_last)
    opt = VSGD(params, lr=0.05, weight_decay=0.01, **opt_kwargs)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        if lrs:
            opt.param_groups[0]["lr"] = lrs[step]
        for p in params:
            g = (torch.randn(p.shape, generator=gen) * 0.1 + 0.02).to(dtype)
            p.grad = g if contiguous_grads else torch.empty_like(p).copy_(g)
        opt.step()
    return params, opt


def assert_same(a, b, opt_a, opt_b, **tolerance):
    for x, y in zip(a, b):
        if tolerance:
            torch.testing.assert_close(x, y, **tolerance)
        else:
            assert torch.equal(x, y)
        for key in ("mug", "bg", "bhg"):
            if tolerance:
                torch.testing.assert_close(opt_a.state[x][key], opt_b.state[y][key], **tolerance)
            else:
                assert torch.equal(opt_a.state[x][key], opt_b.state[y][key]), key


# ------------------------------------------------------------------------- unfused, chunked
@pytest.mark.parametrize("path", [dict(foreach=False), dict(foreach=True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_unfused_path_equals_whole_tensors_bitwise(monkeypatch, path, dtype):
    a, opt_a = run(path, dtype=dtype, channels_last=True)
    monkeypatch.setattr(vsgd_update, "CHUNK", 2**40)  # one piece per tensor: the plain ops
    b, opt_b = run(path, dtype=dtype, channels_last=True)
    assert_same(a, b, opt_a, opt_b)


def test_pieces_are_cache_sized_views():
    params = make_params([(300, 301)])
    params[0].grad = torch.zeros_like(params[0])
    state = [torch.zeros_like(params[0]) for _ in range(3)]
    pieces = vsgd_update.pieces((params[0], params[0].grad, *state))
    assert [p[0].numel() for p in pieces] == [65536, 24764]
    assert all(p[0].data_ptr() == params[0].data_ptr() + 4 * 65536 * i for i, p in enumerate(pieces))


# ---------------------------------------------------------------------------------- fused
def test_cpu_kernel_handles_layouts_and_dtypes_like_contiguous_tensors():
    """channels_last parameters with contiguous gradients (staged copies) and bf16
    parameters (fp32 state) give what plain contiguous fp32 tensors give."""
    plain, opt_plain = run(dict(fused=True), shapes=[(64, 40, 7, 7), (1000,)])
    mixed, opt_mixed = run(dict(fused=True), shapes=[(64, 40, 7, 7), (1000,)], channels_last=True,
                           contiguous_grads=True)
    assert mixed[0].is_contiguous(memory_format=torch.channels_last)
    assert_same(plain, mixed, opt_plain, opt_mixed)
    bf16, opt_bf16 = run(dict(fused=True), dtype=torch.bfloat16)
    ref, opt_ref = run(dict(foreach=False), dtype=torch.bfloat16)
    assert opt_bf16.state[bf16[0]]["mug"].dtype == torch.float32
    for x, y in zip(bf16, ref):  # one bf16 rounding apart at most
        torch.testing.assert_close(x.float(), y.float(), rtol=2**-7, atol=1e-6)


@pytest.fixture
def fresh_fused_state(monkeypatch, tmp_path):
    """No library loaded, with an empty kernel cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    vsgd_cpu.library.cache_clear()
    yield
    vsgd_cpu.library.cache_clear()


def test_fallback_without_compiler_warns_once_per_optimizer_and_steps_unfused(fresh_fused_state, monkeypatch,
                                                                              caplog):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails, as a missing one would
    with caplog.at_level(logging.WARNING, logger="vsgd_dist.optim.vsgd_fused"):
        fused, opt_fused = run(dict(fused=True))
        run(dict(fused=True))
    warnings = [r for r in caplog.records if r.name == "vsgd_dist.optim.vsgd_fused"]
    assert len(warnings) == 2 and all("\n" not in w.getMessage() for w in warnings)  # 6 steps each
    assert "fused kernel unavailable (RuntimeError: false failed" in warnings[0].getMessage()
    assert opt_fused.fused_path.unavailable.startswith("RuntimeError: false failed")
    unfused, opt_unfused = run(dict(foreach=False))
    assert_same(fused, unfused, opt_fused, opt_unfused)


def test_cpu_kernel_builds_once_per_machine(fresh_fused_state, tmp_path):
    vsgd_cpu.library()
    built = list((tmp_path / "vsgd_dist").glob("vsgd-*.so"))
    assert len(built) == 1
    vsgd_cpu.library.cache_clear()
    stamp = built[0].stat().st_mtime_ns
    vsgd_cpu.library()
    assert built[0].stat().st_mtime_ns == stamp and len(list((tmp_path / "vsgd_dist").iterdir())) == 1


@pytest.fixture
def use_triton_on_cpu(monkeypatch):
    """Puts fused VSGD's CUDA kernel (`vsgd_triton`) in place of the C++ kernel for CPU
    tensors, its kernels run by Triton's interpreter."""
    pytest.importorskip("triton", reason="Triton comes with requirements-dev.txt")
    from vsgd_dist.optim import vsgd_triton

    def use() -> None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # read where @triton.jit runs: on (re)import
        interpreted = importlib.reload(vsgd_triton)
        monkeypatch.setattr(vsgd_fused, "_kernel", lambda *dtypes: (interpreted.TritonTable, None))

    yield use
    monkeypatch.undo()
    importlib.reload(vsgd_triton)


def test_triton_kernel_matches_the_cpu_kernel_on_every_layout(use_triton_on_cpu):
    """One launch over a list of tensors with blocks straddling their ends, channels_last
    parameters with contiguous gradients (staged copies), a new lr every step and t = 1."""
    shapes = [(64, 40, 7, 7), (33, 7), (5,), (5000,), (3, 5, 1, 1)]
    lrs = [0.05, 0.04, 0.03, 0.02, 0.01, 0.005]
    kwargs = dict(shapes=shapes, lrs=lrs, channels_last=True, contiguous_grads=True)
    cpu, opt_cpu = run(dict(fused=True), **kwargs)
    use_triton_on_cpu()
    interpreted, opt_interpreted = run(dict(fused=True), **kwargs)
    [kept] = opt_interpreted.fused_path.tables.values()
    assert type(kept.table).__name__ == "TritonTable"
    assert_same(cpu, interpreted, opt_cpu, opt_interpreted, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kernel", ["C++", "Triton"])
def test_kernel_table_is_kept_while_the_pointers_stay(request, kernel):
    if kernel == "Triton":
        request.getfixturevalue("use_triton_on_cpu")()
    params = make_params([(300, 7), (11,)])
    opt = VSGD(params, lr=0.01, fused=True)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    [kept] = opt.fused_path.tables.values()
    table = kept.table
    before = [p.detach().clone() for p in params]
    opt.step()
    assert kept.table is table and all(not torch.equal(p, b) for p, b in zip(params, before))
    if kernel == "Triton":
        assert table.blocks == 3 + 1  # 2100 and 11 elements, BLOCK 1024
    old_grads = [p.grad for p in params]  # kept alive: the new gradients get new memory
    for p in params:
        p.grad = torch.full_like(p, 2.0)
    opt.step()
    assert kept.table is not table and old_grads
    reference = make_params([(300, 7), (11,)])
    ref_opt = VSGD(reference, lr=0.01, fused=True)
    for value in (1.0, 1.0, 2.0):  # a fresh table every step: the same numbers
        for p in reference:
            p.grad = torch.full_like(p, value)
        ref_opt.step()
        ref_opt.fused_path.forget_tables()
    assert all(torch.equal(p, r) for p, r in zip(params, reference))


def test_staged_copies_rebuild_the_table_every_step():
    """Tensors that need copies (here bf16 parameters, fp32 state) get a table of the copies,
    which is not kept: the next step's copies live elsewhere."""
    params = make_params([(40, 3)], dtype=torch.bfloat16)
    opt = VSGD(params, lr=0.01, fused=True)
    tables = []
    for _ in range(2):
        params[0].grad = torch.ones_like(params[0])
        opt.step()
        [kept] = opt.fused_path.tables.values()
        assert kept.identity is None
        tables.append(kept.table)
    assert tables[0] is not tables[1]


def test_planned_steps_give_the_bucketed_steps_bits_and_yield_to_changes():
    """A group's plan (one launch per step) gives the numbers of the bucket-by-bucket fused step
    (plans dropped after every step), through what must renew or end a plan: gradients in new
    memory, the same gradients again (step 3), gradients of another layout (5: staged copies,
    no plan), a reload (6), a missing gradient (8: the step counts part, no plan)."""
    shapes = [(8, 3, 3, 3), (300, 7), (11,)]
    planned, bucketed = make_params(shapes, channels_last=True), make_params(shapes, channels_last=True)
    opt = VSGD(planned, lr=0.02, weight_decay=0.01, fused=True)
    ref = VSGD(bucketed, lr=0.02, weight_decay=0.01, fused=True)
    gen = torch.Generator().manual_seed(1)
    for step in range(9):
        if step != 3:
            for p, q in zip(planned, bucketed):
                g = torch.randn(p.shape, generator=gen)
                p.grad = g if step == 5 else torch.empty_like(p).copy_(g)
                q.grad = p.grad.clone(memory_format=torch.preserve_format)
        if step == 8:
            planned[2].grad = bucketed[2].grad = None
        if step == 6:
            opt.load_state_dict(opt.state_dict())
        opt.step()
        ref.step()
        ref.fused_path.plans.clear()
        assert (0 in opt.fused_path.plans) == (step not in (5, 8)), step
        assert_same(planned, bucketed, opt, ref)
    assert [int(opt.state[p]["step"]) for p in planned] == [9, 9, 8]


# ---------------------------------------------------------------------------- IVON fused
IVON_HP = dict(lr=0.05, ess=50.0, hess_init=0.5, beta1=0.9, beta2=0.99, weight_decay=0.01, clip_radius=1.0)
IVON_SHAPES = [(64, 40, 3, 3), (33, 7), (5,), (5000,), (3, 5, 1, 1)]


def ivon_run(opt_kwargs, steps=4, dtype=torch.float32, mc_samples=1, channels_last=False, runs=None,
             shapes=IVON_SHAPES, **hp):
    """IVON on `shapes` with its own noise; with `runs`, one flat master described by them."""
    params = make_params(shapes, dtype, channels_last)
    if runs is not None:
        params = [torch.cat([p.detach().reshape(-1) for p in params]).requires_grad_()]
    opt = IVON(params, **{**IVON_HP, **hp}, mc_samples=mc_samples, **opt_kwargs)
    if runs is not None:
        opt.set_global_offset(params[0], runs)
    gen = torch.Generator().manual_seed(1)
    samples = []
    for _ in range(steps):
        for k in range(mc_samples):
            opt.sample(k)
            samples.append([p.detach().clone() for p in params])
            for p in params:
                p.grad = (p.detach() * 0.3 + torch.randn(p.shape, generator=gen).to(dtype) * 0.1)
            if k + 1 < mc_samples:
                opt.accumulate()
        opt.step()
    return params, opt, samples


@pytest.mark.parametrize("start", [0, 1, 3, 4097, 2**32 - 3, 2**61])
def test_cpu_noise_is_the_reference_bitwise(start):
    """The C++ draw (vectorized blocks, unaligned starts, indices beyond 32 bits, a seed beyond
    32 bits) gives the bits of the torch reference, `noise.standard_normal`."""
    for seed, step, sample in ((0, 1, 0), (2**40 + 7, 2**32 - 1, 3)):
        assert torch.equal(ivon_cpu.normals(seed, step, sample, start, 3001),
                           noise.standard_normal(seed, step, sample, start, 3001))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_ivon_samples_are_the_unfused_samples_bitwise(dtype):
    """From one state (after three fused steps), every weight sample the fused kernel writes
    (the first keeps the mean, later ones start from it) and its eps are the per-tensor path's,
    channels_last tensors included; fp64 to sqrt's rounding (torch's float64 sqrt is not
    correctly rounded, the kernel's is)."""
    fused, fused_opt, _ = ivon_run(dict(fused=True), steps=3, dtype=dtype, mc_samples=3, channels_last=True)
    plain = [p.detach().clone().requires_grad_() for p in fused]
    plain_opt = IVON(plain, **IVON_HP, mc_samples=3, foreach=False)
    plain_opt.load_state_dict(fused_opt.state_dict())
    for k in range(3):
        fused_opt.sample(k)
        plain_opt.sample(k)
        for x, y in zip(fused, plain):
            pairs = [(x, y), (fused_opt._stash[x][1], plain_opt._stash[y][1])]  # eps: private, the kernel's output
            for a, b in pairs:
                if dtype == torch.float32:
                    assert torch.equal(a, b)
                else:
                    torch.testing.assert_close(a, b, rtol=1e-15, atol=0)
        fused_opt.accumulate()
        plain_opt.accumulate()


def test_fused_ivon_master_of_runs_equals_its_tensors():
    """One flat master holding the tensors' elements in another order, described as runs (a
    ZeRO rank's buckets fill in reverse), draws and steps to the tensors' numbers bitwise."""
    sizes = [math.prod(s) for s in IVON_SHAPES]
    total = sum(sizes)
    order = torch.cat([torch.arange(sizes[0], total), torch.arange(0, sizes[0])])
    params = make_params(IVON_SHAPES)
    master = torch.cat([p.detach().reshape(-1) for p in params])[order].requires_grad_()
    opt_params, opt_master = IVON(params, **IVON_HP, fused=True), IVON([master], **IVON_HP, fused=True)
    opt_master.set_global_offset(master, [(sizes[0], total - sizes[0]), (0, sizes[0])])
    target = torch.randn(total, generator=torch.Generator().manual_seed(2))
    for _ in range(4):
        opt_params.sample()
        opt_master.sample()
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        assert torch.equal(flat[order], master.detach())
        for p, g in zip(params, (flat - target).split(sizes)):
            p.grad = g.view(p.shape)
        master.grad = (flat - target)[order]
        opt_params.step()
        opt_master.step()
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in params])[order], master.detach())


@pytest.fixture
def ivon_triton_on_cpu(monkeypatch):
    """Puts fused IVON's CUDA kernels (`ivon_triton`) in place of the C++ kernels for CPU
    tensors, run by Triton's interpreter."""
    pytest.importorskip("triton", reason="Triton comes with requirements-dev.txt")
    from vsgd_dist.optim import ivon_triton

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    interpreted = importlib.reload(ivon_triton)
    tables = (interpreted.TritonSampleTable, interpreted.TritonStepTable)
    monkeypatch.setattr(ivon_fused, "_kernels", lambda device, dtype: tables if dtype == torch.float32 else None)
    yield interpreted
    monkeypatch.undo()
    importlib.reload(ivon_triton)


@pytest.mark.parametrize("hp", [dict(mc_samples=2), dict(hess_approx="gradsq", clip_radius=math.inf)],
                         ids=["price-mc2", "gradsq"])
def test_triton_ivon_kernels_give_the_cpu_kernels_bits(ivon_triton_on_cpu, hp):
    """Sample and step through the Triton kernels (one launch each over the whole list, blocks
    straddling tensor ends) give the C++ kernels' bits: the same integer Philox and the same
    float32 operations, each rounded on its own."""
    shapes = [(40, 3, 3, 3), (33, 7), (5,), (1500,), (3, 5, 1, 1)]
    cpu, cpu_opt, cpu_samples = ivon_run(dict(fused=True), steps=2, channels_last=True, shapes=shapes, **hp)
    triton_params, triton_opt, triton_samples = ivon_run(dict(fused=True), steps=2, channels_last=True,
                                                         shapes=shapes, **hp)
    [kept] = [k for key, k in triton_opt.fused_path.step_tables.items()]
    assert type(kept.table).__name__ == "TritonStepTable"
    for a, b in zip(cpu_samples, triton_samples):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    for x, y in zip(cpu, triton_params):
        assert torch.equal(x, y)
        assert torch.equal(cpu_opt.state[x]["h"], triton_opt.state[y]["h"])
        assert torch.equal(cpu_opt.state[x]["m"], triton_opt.state[y]["m"])


def test_fused_ivon_keeps_its_tables_and_buffers_while_addresses_hold():
    """A group's plan (private: what the kept tables are is the point) keeps its sample table,
    buffers and, while the gradients' addresses hold, its step table; new gradients get a new
    step table, and the numbers equal a run that rebuilds everything every step."""
    params = make_params([(300, 7), (11,)])
    opt = IVON(params, **IVON_HP, fused=True)
    grads = [torch.ones_like(p) for p in params]
    for _ in range(3):
        opt.sample()
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    plan = opt.fused_path.plans[0]
    tables = plan.sample_table, plan.step_table
    buffers = {p: tuple(t.data_ptr() for t in b) for p, b in opt.fused_path.buffers.items()}
    opt.sample()
    old_grads = grads  # kept alive: the new gradients get new memory
    for p in params:
        p.grad = torch.full_like(p, 2.0)
    opt.step()
    assert opt.fused_path.plans[0] is plan and plan.sample_table is tables[0] and old_grads
    assert plan.step_table is not tables[1] and plan.t == 4
    assert buffers == {p: tuple(t.data_ptr() for t in b) for p, b in opt.fused_path.buffers.items()}
    reference = make_params([(300, 7), (11,)])
    ref_opt = IVON(reference, **IVON_HP, fused=True)
    for value in (1.0, 1.0, 1.0, 2.0):
        ref_opt.sample()
        for p in reference:
            p.grad = torch.full_like(p, value)
        ref_opt.step()
        ref_opt.fused_path.forget_tables()
    assert all(torch.equal(p, r) for p, r in zip(params, reference))
    assert all(int(opt.state[p]["step"]) == 4 for p in params)


def test_fused_ivon_without_compiler_warns_and_runs_unfused(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    ivon_cpu.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="vsgd_dist.optim.ivon_fused"):
            fused, _, fused_samples = ivon_run(dict(fused=True))
    finally:
        ivon_cpu.library.cache_clear()
    warnings = [r for r in caplog.records if r.name == "vsgd_dist.optim.ivon_fused"]
    assert len(warnings) == 1 and "fused kernel unavailable (RuntimeError: false failed" in warnings[0].getMessage()
    plain, _, plain_samples = ivon_run(dict(foreach=False))
    assert all(torch.equal(x, y) for x, y in zip(fused, plain))


# ------------------------------------------------------------------------------ allocator
def _rank_env(rank, world_size):
    return {k: os.environ.get(k) for k in ("LD_PRELOAD", "MALLOC_CONF", "MALLOC_MMAP_MAX_",
                                           "MALLOC_TRIM_THRESHOLD_")}


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_ranks_start_with_the_caching_allocator_env(monkeypatch):
    for key in ("LD_PRELOAD", "MALLOC_CONF", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(key, raising=False)
    expected = allocator.allocator_env()
    assert expected  # a preload library or the glibc settings
    before = dict(os.environ)
    envs = run_distributed(_rank_env, 2, timeout=100)
    assert dict(os.environ) == before  # the launcher's own environment is left alone
    for env in envs:
        assert {k: v for k, v in env.items() if v is not None} == expected


def test_allocator_env_prefers_a_preload_and_respects_the_user(tmp_path, monkeypatch):
    monkeypatch.setattr(allocator, "library_dirs", lambda environ: [str(tmp_path)])
    assert allocator.allocator_env({}) == allocator.GLIBC
    assert allocator.allocator_env({"MALLOC_MMAP_MAX_": "4"}) == {"MALLOC_TRIM_THRESHOLD_": str(2**40)}
    (tmp_path / "libjemalloc.so.2").touch()
    assert allocator.allocator_env({"LD_PRELOAD": "/x/libfoo.so"}) == {
        "LD_PRELOAD": f"{tmp_path}/libjemalloc.so.2:/x/libfoo.so", "MALLOC_CONF": allocator.JEMALLOC_CONF}
    assert allocator.allocator_env({"LD_PRELOAD": "/opt/libtcmalloc.so.4"}) == {}


@pytest.mark.dist
def test_slurm_jobs_on_cpu_profiles_set_the_allocator_env_on_the_node(monkeypatch):
    args = argparse.Namespace(nodes=1, gpus_per_node=None, tasks_per_node=2, time="60", partition=None,
                              account=None, qos=None)
    cpu = build_spec(ClusterProfile(name="cpu", gpus_per_node=0, cpus_per_node=8, max_nodes=1,
                                    max_tasks_per_node=8), args, "job").setup
    gpu = build_spec(ClusterProfile(name="gpu", gpus_per_node=8, cpus_per_node=96, max_nodes=1,
                                    max_tasks_per_node=8), argparse.Namespace(**{**vars(args), "tasks_per_node": None}),
                     "job").setup
    line = f'eval "$({sys.executable} {REPO}/vsgd_dist/allocator.py)"'
    assert line in cpu and line not in gpu
    for key in ("LD_PRELOAD", "MALLOC_CONF", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(key, raising=False)
    shown = subprocess.run(["bash", "-c", f"{line}; env"], capture_output=True, text=True, check=True).stdout
    assert all(f"{k}={v}" in shown.splitlines() for k, v in allocator.allocator_env().items())
