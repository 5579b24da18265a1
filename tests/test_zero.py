"""ZeroOptimizer against the unsharded optimizer, on real gloo processes.

Tolerances (and why):
- optimizer level, BITWISE (rtol = atol = 0): every rank's gradient is a small integer times
  2**-6, so the cross-rank sum is exact in any order; the reference sums the same values and
  divides by W the same way, and the update is elementwise, so nothing may differ. Covers
  stage 1 and 2, VSGD and AdamW, fp32 and bf16 parameters, weight-decay groups, a LambdaLR
  warm-up, no_sync() accumulation, the consolidated state and a same-world-size resume; with
  fp32 parameters the masters are the parameter buckets' own slices (no copy).
- clipping, rtol 1e-5: the global norm is summed per shard then across ranks, torch sums
  per parameter; the squares are rounded in another order (~1e-7 relative in fp32).
- end to end (real model, each rank a slice of the global batch), rtol/atol 1e-4: the
  averaged gradient (per-rank mean, then reduced) rounds differently from one full-batch
  backward (~1e-7 relative), and 20 Adam-like steps normalise those differences per element.
- diagnostics, rtol 1e-5: the per-group sums are added over shards in another order.
"""
from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
import torch.distributed as dist

from vsgd_dist.optim.diagnostics import reduced_diagnostics
from vsgd_dist.optim.vsgd import VSGD
from vsgd_dist.optim.vsgd_diagnostics import DIAGNOSTICS, diagnostic_sums
from vsgd_dist.sharding import ZeroOptimizer, consolidate, shard_from_full
from full_batch import train_side_by_side

from vsgd_dist.spawn import run_distributed

STEPS = 20
BUCKET_CAP_MB = 256 / 2**20  # 64 fp32 elements: several buckets, each padded differently
OPTIMIZERS = {"vsgd": (VSGD, dict(lr=0.05)), "adamw": (torch.optim.AdamW, dict(lr=0.01))}


def make_model(dtype=torch.float32) -> torch.nn.Module:
    """Odd shapes: 170 parameters, groups of 141 and 29 elements."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(13, 7), torch.nn.LayerNorm(7), torch.nn.GELU(),
                               torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dtype)


def param_groups(named_params, weight_decay=0.1) -> list[dict]:
    """Weight decay on matrices only, as the recipes do."""
    named = list(named_params)
    decay = [(n, p) for n, p in named if p.dim() > 1]
    no_decay = [(n, p) for n, p in named if p.dim() <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5))


def exact_grads(shapes, step: int, rank: int) -> list[torch.Tensor]:
    """Integers times 2**-6: sums over ranks and micro-batches are exact in any order."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randint(-64, 65, s, generator=g).float() * 2.0**-6 for s in shapes]


def reference_optimizer(model, optimizer_class, kwargs):
    """An unsharded fp32 copy of `model`'s parameters with the same groups and schedule."""
    params = [(n, p.detach().float().clone()) for n, p in model.named_parameters()]
    optimizer = optimizer_class(param_groups(params), **kwargs)
    return dict(params), optimizer, warmup(optimizer)


def check_optimizer_bitwise(rank, world_size, opt_name, stage, dtype):
    optimizer_class, kwargs = OPTIMIZERS[opt_name]
    model = make_model(dtype)
    ref_params, ref_opt, ref_sched = reference_optimizer(model, optimizer_class, kwargs)
    opt = ZeroOptimizer(param_groups(model.named_parameters()), optimizer_class, stage=stage,
                        bucket_cap_mb=BUCKET_CAP_MB, **kwargs)
    check_masters_alias_fp32_buckets(opt, dtype)
    sched = warmup(opt)
    names, params = zip(*model.named_parameters())
    shapes = [p.shape for p in params]
    for step in range(STEPS):
        micro = [[exact_grads(shapes, 2 * step + m, r) for m in range(2)] for r in range(world_size)]
        # Every third step the first parameter takes no part in the loss: its hooks never
        # fire and its bucket is reduced by the remaining-bucket path, as a zero gradient.
        unused = stage == 2 and step % 3 == 2
        if stage == 2:  # two micro-batches through backward hooks, the first under no_sync()
            for m in range(2):
                with opt.no_sync() if m == 0 else torch.enable_grad():
                    sum((p * g.to(dtype)).sum() for i, (p, g) in enumerate(zip(params, micro[rank][m]))
                        if not (unused and i == 0)).backward()
        else:  # stage 1: `.grad` already holds the average, as DDP leaves it
            for p, *per_rank in zip(params, *[mg[0] for mg in micro]):
                p.grad = (sum(per_rank) / world_size).to(dtype)
        opt.step()
        opt.zero_grad()
        sched.step()
        for i, name in enumerate(names):
            grads = [micro[r][m][i] for r in range(world_size) for m in range(2 if stage == 2 else 1)]
            ref_params[name].grad = torch.zeros_like(grads[0]) if unused and i == 0 else sum(grads) / world_size
        ref_opt.step()
        ref_opt.zero_grad()
        ref_sched.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, ref_params[name].to(dtype)), f"{opt_name} stage {stage} {dtype}: {name}"
    check_state(opt, ref_opt, ref_params, world_size)
    return opt, ref_opt, ref_params


def check_masters_alias_fp32_buckets(opt, dtype):
    """fp32 buckets: each master is this rank's slice of the bucket itself (no copy); others
    keep an fp32 copy. Reads the private `_param_buffers`: whether a master aliases the bucket's
    storage is a memory property no public method exposes, and the only way to see it."""
    for bucket, master, buffer in zip(opt.buckets, opt.masters, opt._param_buffers):
        lo, hi = bucket.owned(opt.rank)
        assert master.dtype == torch.float32 and master.numel() == hi - lo
        assert (master.data_ptr() == buffer[lo:hi].data_ptr()) == (dtype == torch.float32)


def check_state(opt, ref_opt, ref_params, world_size):
    """Consolidated shards equal the unsharded state; state bytes are 1/W of it + padding."""
    shards = [None] * world_size
    dist.all_gather_object(shards, opt.state_dict())
    full = consolidate(shards)
    for name, ref_param in ref_params.items():
        assert torch.equal(full[name]["master"], ref_param), name
        for key, value in ref_opt.state[ref_param].items():
            assert torch.equal(torch.as_tensor(full[name][key]), value), (name, key)
    per_rank = torch.tensor([opt.state_bytes()])
    everyone = [torch.zeros_like(per_rank) for _ in range(world_size)]
    dist.all_gather(everyone, per_rank)
    assert all(int(b) == opt.state_bytes() for b in everyone)
    unsharded = sum(v.nbytes for s in ref_opt.state.values() for v in s.values() if v.dim() > 0)
    bytes_per_element = unsharded // sum(p.numel() for p in ref_params.values())
    padding = sum(b.padded_numel - b.numel for b in opt.buckets)
    assert padding <= (world_size - 1) * len(opt.buckets)
    assert world_size * opt.state_bytes() == unsharded + padding * bytes_per_element


def check_diagnostics(opt, ref_opt, ref_params):
    """Reduced per-layer means equal the unsharded VSGD's."""
    layer_of = {name: name.split(".")[0] for name in ref_params}
    sharded, _ = reduced_diagnostics(DIAGNOSTICS, opt.state_pieces(DIAGNOSTICS.state_keys), layer_of.get, reduce=True,
                                     device=opt.device)
    sums: dict[str, torch.Tensor] = {}
    for group in ref_opt.param_groups:
        for p in group["params"]:
            name = next(n for n, q in ref_params.items() if q is p)
            s = ref_opt.state[p]
            row = diagnostic_sums(s["mug"], s["bg"], s["bhg"], lr=group["lr"], eps=group["eps"],
                                  ps=group["ps"], ghattg=group["ghattg"]).double()
            sums[layer_of[name]] = sums.get(layer_of[name], 0) + row
    assert sharded.keys() == sums.keys()
    for layer, row in sums.items():
        expected = [row[0].item()] + (row[1:] / row[0]).tolist()
        got = [sharded[layer][k] for k in ("count", "snr", "posterior_std", "implied_beta1", "effective_step")]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected, dtype=torch.float32),
                                   rtol=1e-5, atol=0)


def check_resume_bitwise(rank, world_size):
    """state_dict at step 5, then 5 more steps == load it into a fresh model+optimizer and run."""
    def run(model, opt, first_step):
        params = list(model.parameters())
        for step in range(first_step, first_step + 5):
            sum((p * g).sum() for p, g in zip(params, exact_grads([p.shape for p in params], step, rank))).backward()
            opt.step()
            opt.zero_grad()
    model = make_model()
    opt = ZeroOptimizer(param_groups(model.named_parameters()), VSGD, bucket_cap_mb=BUCKET_CAP_MB, lr=0.05)
    run(model, opt, 0)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    run(model, opt, 5)
    resumed = make_model()
    resumed.load_state_dict(saved_model)
    resumed_opt = ZeroOptimizer(param_groups(resumed.named_parameters()), VSGD,
                                bucket_cap_mb=BUCKET_CAP_MB, lr=0.05)
    resumed_opt.load_state_dict(saved_opt)
    run(resumed, resumed_opt, 5)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def check_clipping(rank, world_size, opt_name):
    optimizer_class, kwargs = OPTIMIZERS[opt_name]
    model = make_model()
    ref_params, ref_opt, ref_sched = reference_optimizer(model, optimizer_class, kwargs)
    opt = ZeroOptimizer(param_groups(model.named_parameters()), optimizer_class,
                        bucket_cap_mb=BUCKET_CAP_MB, **kwargs)
    sched = warmup(opt)
    names, params = zip(*model.named_parameters())
    for step in range(STEPS):
        per_rank = [exact_grads([p.shape for p in params], step, r) for r in range(world_size)]
        sum((p * g).sum() for p, g in zip(params, per_rank[rank])).backward()
        norm = opt.clip_grad_norm_(1.0)
        opt.step()
        sched.step()
        for i, name in enumerate(names):
            ref_params[name].grad = sum(g[i] for g in per_rank) / world_size
        ref_norm = torch.nn.utils.clip_grad_norm_(list(ref_params.values()), 1.0)
        ref_opt.step()
        ref_sched.step()
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
        assert norm > 1.0  # clipping is active
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref_params[name], rtol=1e-5, atol=1e-6)


def check_end_to_end(rank, world_size, opt_name, stage):
    """Each rank trains on its slice of a global batch of 12; equals full-batch training."""
    optimizer_class, kwargs = OPTIMIZERS[opt_name]
    reference, model = make_model(), make_model()
    ref_opt = optimizer_class(param_groups(reference.named_parameters()), **kwargs)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if stage == 1 else model
    opt = ZeroOptimizer(param_groups(model.named_parameters()), optimizer_class, stage=stage,
                        bucket_cap_mb=BUCKET_CAP_MB, **kwargs)
    train_side_by_side(wrapped, opt, reference, ref_opt, rank, world_size, STEPS)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def check_bitwise_fp32(rank, world_size):
    for opt_name, stage in itertools.product(OPTIMIZERS, (1, 2)):
        check_optimizer_bitwise(rank, world_size, opt_name, stage, torch.float32)


def check_bitwise_bf16(rank, world_size):
    for opt_name in OPTIMIZERS:
        check_optimizer_bitwise(rank, world_size, opt_name, 2, torch.bfloat16)


def check_vsgd_diagnostics(rank, world_size):
    for stage in (1, 2):
        check_diagnostics(*check_optimizer_bitwise(rank, world_size, "vsgd", stage, torch.float32))


def check_end_to_end_all(rank, world_size):
    for opt_name, stage in itertools.product(OPTIMIZERS, (1, 2)):
        check_end_to_end(rank, world_size, opt_name, stage)


def check_clipping_all(rank, world_size):
    for opt_name in OPTIMIZERS:
        check_clipping(rank, world_size, opt_name)


CHECKS = {"bitwise_fp32": check_bitwise_fp32, "bitwise_bf16": check_bitwise_bf16,
          "vsgd_diagnostics": check_vsgd_diagnostics, "end_to_end": check_end_to_end_all,
          "clipping": check_clipping_all, "resume_bitwise": check_resume_bitwise}
"""One test per check, so that one failing check does not hide the others."""
CASES = [(check, world) for check in CHECKS for world in ((1, 2, 3, 4) if check == "bitwise_fp32" else (2, 3))]
"""Every world size for the core bitwise check (buckets padded 0-3 elements); 2 and 3 ranks
(even and uneven splits) for the rest."""


@pytest.mark.dist
@pytest.mark.timeout(300)
@pytest.mark.parametrize("check,world_size", CASES, ids=[f"{c}-world{w}" for c, w in CASES])
def test_zero_matches_unsharded(check, world_size):
    run_distributed(CHECKS[check], world_size, timeout=280)


GRAD_STEPS = 6


def identical_grad_steps(model, opt, first_step):
    """Gradients equal on every rank: their average is exactly the same at any world size."""
    params = list(model.parameters())
    for step in range(first_step, first_step + GRAD_STEPS):
        sum((p * g).sum() for p, g in zip(params, exact_grads([p.shape for p in params], step, 0))).backward()
        opt.step()
        opt.zero_grad()


def save_at(rank, world_size):
    model = make_model()
    opt = ZeroOptimizer(param_groups(model.named_parameters()), VSGD, bucket_cap_mb=BUCKET_CAP_MB, lr=0.05)
    identical_grad_steps(model, opt, 0)
    return to_bytes((opt.state_dict(), model.state_dict()))


def to_bytes(obj) -> bytes:
    """Tensors cross process boundaries as bytes (shared-memory handles die with the sender)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def resume_at(rank, world_size, saved):
    shards, model_states = zip(*map(from_bytes, saved))
    full = consolidate(shards)
    model_state = model_states[0]
    model = make_model()
    model.load_state_dict(model_state)
    opt = ZeroOptimizer(param_groups(model.named_parameters()), VSGD, bucket_cap_mb=BUCKET_CAP_MB, lr=0.05)
    with pytest.raises(ValueError, match="world size 2"):
        opt.load_state_dict(shards[0] if rank == 0 else shards[1])
    opt.load_state_dict(shard_from_full(full, opt, shards[0]["param_groups"]))
    with pytest.raises(NotImplementedError, match="pass all groups to the constructor"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    identical_grad_steps(model, opt, GRAD_STEPS)

    uninterrupted = make_model()
    ref_opt = VSGD(param_groups(uninterrupted.named_parameters()), lr=0.05)
    identical_grad_steps(uninterrupted, ref_opt, 0)
    identical_grad_steps(uninterrupted, ref_opt, GRAD_STEPS)
    for a, b in zip(model.parameters(), uninterrupted.parameters()):
        assert torch.equal(a, b)
    # the resharded state's bucket padding stays finite too (a checkpoint may hold no NaN)
    for shard in opt.state_dict()["state"]:
        assert all(bool(torch.isfinite(v).all()) for v in shard.values() if torch.is_tensor(v)), rank


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_save_at_two_ranks_resume_at_three():
    saved = run_distributed(save_at, 2, timeout=140)
    run_distributed(resume_at, 3, saved, timeout=140)


def test_bad_input():
    model = make_model()
    with pytest.raises(ValueError, match="stage must be 1"):
        ZeroOptimizer(model.parameters(), torch.optim.AdamW, stage=3)
    with pytest.raises(ValueError, match="LBFGS is not known to be elementwise.*elementwise = True"):
        ZeroOptimizer(model.parameters(), torch.optim.LBFGS)
    on_meta = torch.nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="several devices"):
        ZeroOptimizer([*model.parameters(), on_meta], torch.optim.AdamW)
    with pytest.raises(ValueError, match="names must be unique"):
        ZeroOptimizer([("w", model[0].weight), ("w", model[0].bias)], torch.optim.AdamW)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ZeroOptimizer(model.parameters(), torch.optim.AdamW)
