"""The DeepSpeed engine (ZeRO-1/2 via deepspeed.initialize) on real gloo processes.

Importing DeepSpeed and starting its engine costs seconds per process, so one spawn per
world size runs every check on its ranks and returns numbers; the tests assert on them.

Tolerances (and why):
- fp32 against the unsharded single-process run, 10 steps (warm-up LR, clipping at 1.0, wd
  on matrices only): max |difference| <= 1e-6 on the parameters, grad norm rtol 1e-5. Each
  rank averages its slice of the batch and DeepSpeed pre-divides by W before summing, which
  rounds differently from one full-batch backward (measured: 2e-7).
- bf16 (bf16 parameters and gradients, fp32 masters, bf16 gradient reduction: DeepSpeed's
  defaults) against a single process doing the same mixed precision on the full batch:
  max |difference| <= 0.1 of the largest parameter change over the run, grad norm rtol 2e-2
  (measured: 0.03 and 7e-3).
  A per-rank bf16 gradient is rounded from a sum over fewer samples, so gradients differ by
  ~bf16 epsilon (4e-3) relative, and VSGD's normalised update passes that on to elements
  whose gradients are small.
- DeepSpeed against the native ZeroOptimizer, 20 fp32 steps: |difference| <= 1e-6 (both
  differ from one full-batch backward in the last bits; measured 3e-7 for VSGD, 0 for AdamW).
- save / resume at the same world size: bitwise.
- VSGD diagnostics (per parameter, reduced over ranks) against the unsharded optimizer's:
  rtol 1e-4 (sums in another order over states that agree to ~1e-7).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch.__main__ import main as launch
from vsgd_dist.config import RunConfig
from vsgd_dist.optim.adamw import AdamWHparams
from vsgd_dist.engines.deepspeed import deepspeed_config
from vsgd_dist.engines.ownership import state_bytes, state_pieces
from vsgd_dist.train.engine_setup import engine_for, engine_setup
from vsgd_dist.spawn import run_distributed

pytestmark = pytest.mark.dist  # the tests read results of multi-rank runs (fixtures)

GLOBAL_BATCH = 12  # divisible by 1, 2 and 3 ranks
LR = 0.05
CLIP = 1.0
FP32_ATOL = 1e-6
NORM_RTOL_FP32 = 1e-5
BF16_OF_MOVEMENT = 0.1
NORM_RTOL_BF16 = 2e-2
NATIVE_ATOL = 1e-6
DIAG_RTOL = 1e-4


def make_cfg(opt="vsgd", engine="deepspeed", stage=2, precision="fp32", clip=CLIP) -> RunConfig:
    cfg = RunConfig()
    cfg.optim.name, cfg.optim.weight_decay = opt, 0.1
    cfg.engine.name, cfg.engine.zero_stage, cfg.engine.bucket_mb = engine, stage, 256 / 2**20  # 64 fp32 elements
    cfg.train.global_batch, cfg.train.precision, cfg.train.grad_clip = GLOBAL_BATCH, precision, clip
    return cfg


def make_model(seed=0) -> nn.Module:
    """Odd shapes (170 parameters; groups of 141 and 29 elements) so partitions cut tensors."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 7), nn.LayerNorm(7), nn.GELU(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))


def batch(step, rank=0, world=1):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(GLOBAL_BATCH, 13, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g)
    n = GLOBAL_BATCH // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def warmup(optimizer, first=0):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (first + s + 1) / 5))


def loss_of(module, step, rank, world, bf16):
    x, y = batch(step, rank, world)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # as the trainer does
        return ((module(x) - y) ** 2).mean()


def train(engine, steps, rank, world, bf16=False, first=0):
    """The trainer's loop through the Engine interface; returns the grad norms."""
    scheduler = warmup(engine.optimizer, first)
    norms = []
    for step in range(first, first + steps):
        engine.backward(loss_of(engine.wrapped, step, rank, world, bf16))
        norms.append(float(engine.step()))
        scheduler.step()
    return norms


def train_unsharded(cfg, steps):
    """One process, full batch; for bf16 the same mixed precision as DeepSpeed (bf16 model,
    fp32 masters stepped by the optimizer, clipping on the fp32 gradient)."""
    from vsgd_dist.optim import OPTIMIZERS, named_param_groups

    model = make_model()
    bf16 = cfg.train.precision == "bf16"
    masters = {p: p.detach().clone() if bf16 else p for p in model.parameters()}
    model.to(torch.bfloat16 if bf16 else torch.float32)
    groups = [{**g, "params": [masters[p] for p in g["params"]]}
              for g in named_param_groups(model, cfg.optim.weight_decay)]
    o = cfg.optim
    entry = OPTIMIZERS.get(o.name)
    optimizer = entry.optimizer_class(groups, **entry.kwargs(o.hparams, LR, o.weight_decay, o.fused))
    scheduler = warmup(optimizer)
    norms = []
    for step in range(steps):
        loss_of(model, step, 0, 1, bf16).backward()
        for p, master in masters.items():
            if master is not p:
                master.grad = p.grad.float()
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(masters.values()), CLIP)))
        optimizer.step()
        optimizer.zero_grad()
        model.zero_grad()
        scheduler.step()
        with torch.no_grad():
            for p, master in masters.items():
                p.copy_(master)
    return model, optimizer, norms


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p.float() - q.float()).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def norm_rel_diff(a, b) -> float:
    return max(abs(x - y) / y for x, y in zip(a, b))


# ------------------------------------------------------------------------- rank checks
def against_unsharded(rank, world, stage, precision):
    from vsgd_dist.engines.deepspeed import DeepSpeedEngine
    from vsgd_dist.optim.diagnostics import reduced_diagnostics
    from vsgd_dist.optim.vsgd_diagnostics import DIAGNOSTICS

    cfg = make_cfg(stage=stage, precision=precision)
    model = make_model()
    start = make_model()
    engine = DeepSpeedEngine(model, engine_setup(cfg, LR))
    norms = train(engine, 10, rank, world, bf16=precision == "bf16")
    ref, ref_opt, ref_norms = train_unsharded(cfg, 10)
    out = {"param_diff": max_diff(model, ref), "movement": max_diff(ref, start),
           "norm_rel": norm_rel_diff(norms, ref_norms),
           "dtype": str(next(model.parameters()).dtype)}
    if stage == 2 and precision == "fp32":  # diagnostics: every parameter summed over its slices
        names = {p: n for n, p in ref.named_parameters()}
        ref_pieces = ((names[p], *(ref_opt.state[p][k] for k in ("mug", "bg", "bhg")), g)
                      for g in ref_opt.param_groups for p in g["params"])
        cpu = torch.device("cpu")
        pieces = state_pieces(engine.ownership(), DIAGNOSTICS.state_keys)
        means, _ = reduced_diagnostics(DIAGNOSTICS, pieces, lambda n: n, reduce=True, device=cpu)
        ref_means, _ = reduced_diagnostics(DIAGNOSTICS, ref_pieces, lambda n: n, reduce=False, device=cpu)
        out["diagnostics"] = (means, ref_means)
        unsharded = sum(v.nbytes for s in ref_opt.state.values() for v in s.values() if v.dim() > 0)
        out["state_bytes"] = (state_bytes(engine.ownership()), unsharded)
    return out


def against_native(rank, world, opt):
    results = {}
    for name in ("deepspeed", "zero"):
        model = make_model()
        engine = engine_for(model, make_cfg(opt, engine=name), LR)
        norms = train(engine, 20, rank, world)
        results[name] = (model, norms, state_bytes(engine.ownership()))
    (ds, ds_norms, ds_bytes), (native, native_norms, native_bytes) = results["deepspeed"], results["zero"]
    return {"param_diff": max_diff(ds, native), "norm_rel": norm_rel_diff(ds_norms, native_norms),
            "state_bytes": (ds_bytes, native_bytes)}


def resume(rank, world, folder, opt, stage, precision):
    """3 steps, a checkpoint through the trainer's Checkpointer (files read back with
    weights_only=True), 3 more steps; a fresh engine (other initial weights) that loads the
    checkpoint must do the same 3 steps bit for bit."""
    from pathlib import Path

    from vsgd_dist.engines.deepspeed import DeepSpeedEngine
    from vsgd_dist.train.checkpoint import Checkpointer

    cfg = make_cfg(opt, stage=stage, precision=precision)
    bf16 = precision == "bf16"
    model = make_model()
    engine = DeepSpeedEngine(model, engine_setup(cfg, LR))
    train(engine, 3, rank, world, bf16)
    ckpt = Checkpointer(Path(folder) / f"{opt}-{stage}-{precision}", keep=1)
    ckpt.save(engine, cfg, step=3)
    train(engine, 3, rank, world, bf16, first=3)

    fresh = make_model(seed=1)
    resumed = DeepSpeedEngine(fresh, engine_setup(cfg, LR))
    assert ckpt.load_latest(resumed, cfg)["step"] == 3
    train(resumed, 3, rank, world, bf16, first=3)
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))


def all_checks(rank, world, folder):
    out = {("unsharded", s, p): against_unsharded(rank, world, s, p) for s in (1, 2) for p in ("fp32", "bf16")}
    if world == 2:
        out.update({("native", opt): against_native(rank, world, opt) for opt in ("vsgd", "adamw")})
        out[("resume", "vsgd")] = resume(rank, world, folder, "vsgd", 2, "bf16")
        out[("resume", "adamw")] = resume(rank, world, folder, "adamw", 1, "fp32")
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_distributed(all_checks, 2, str(tmp_path_factory.mktemp("ds")), timeout=400)


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    return run_distributed(all_checks, 3, str(tmp_path_factory.mktemp("ds")), timeout=400)


def results_at(request, world):
    return request.getfixturevalue({2: "two_ranks", 3: "three_ranks"}[world])


# ------------------------------------------------------------------------------ tests
@pytest.mark.timeout(420)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("stage", [1, 2])
def test_vsgd_fp32_equals_unsharded(request, world, stage):
    for r in results_at(request, world):
        got = r[("unsharded", stage, "fp32")]
        assert got["param_diff"] <= FP32_ATOL, (world, stage, got)
        assert got["norm_rel"] <= NORM_RTOL_FP32, (world, stage, got)


@pytest.mark.timeout(420)
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("stage", [1, 2])
def test_vsgd_bf16_equals_unsharded_within_bf16(request, world, stage):
    for r in results_at(request, world):
        got = r[("unsharded", stage, "bf16")]
        assert got["dtype"] == "torch.bfloat16"
        assert got["param_diff"] <= BF16_OF_MOVEMENT * got["movement"], (world, stage, got)
        assert got["norm_rel"] <= NORM_RTOL_BF16, (world, stage, got)


@pytest.mark.timeout(420)
@pytest.mark.parametrize("world", [2, 3])
def test_diagnostics_and_state_bytes_match_unsharded(request, world):
    results = results_at(request, world)
    means, ref_means = results[0][("unsharded", 2, "fp32")]["diagnostics"]
    assert set(means) == set(ref_means) and len(means) == 8  # every parameter named, none lost
    assert all(means[n]["count"] == ref_means[n]["count"] for n in means)  # each element on one rank
    for name, stats in ref_means.items():
        for stat, value in stats.items():
            assert means[name][stat] == pytest.approx(value, rel=DIAG_RTOL), (name, stat)
    per_rank = [r[("unsharded", 2, "fp32")]["state_bytes"][0] for r in results]
    unsharded = results[0][("unsharded", 2, "fp32")]["state_bytes"][1]
    # 12 bytes per element; DeepSpeed pads each group to a multiple of 2 * W elements.
    assert unsharded <= sum(per_rank) <= unsharded + 12 * 2 * world * 2
    assert max(per_rank) - min(per_rank) == 0


@pytest.mark.timeout(420)
@pytest.mark.parametrize("opt", ["vsgd", "adamw"])
def test_deepspeed_equals_native_zero(two_ranks, opt):
    for r in two_ranks:
        got = r[("native", opt)]
        assert got["param_diff"] <= NATIVE_ATOL, got
        assert got["norm_rel"] <= NORM_RTOL_FP32, got
        ds_bytes, native_bytes = got["state_bytes"]
        assert abs(ds_bytes - native_bytes) <= 12 * 4 * 2, got  # both 1/W of the state, padding apart


@pytest.mark.timeout(420)
@pytest.mark.parametrize("opt", ["vsgd", "adamw"])
def test_resume_same_world_size_is_exact(two_ranks, opt):
    assert all(r[("resume", opt)] for r in two_ranks)


def test_deepspeed_config():
    cfg = make_cfg("vsgd", stage=1, precision="fp32", clip=2.5)
    cfg.engine.bucket_mb = 25.0
    cfg.train.global_batch = 512
    config = deepspeed_config(engine_setup(cfg, 0.3), 4, cuda=False)
    assert config["train_batch_size"] == 512 and config["train_micro_batch_size_per_gpu"] == 128
    assert config["gradient_accumulation_steps"] == 1 and config["gradient_clipping"] == 2.5
    assert config["bf16"] == {"enabled": False}
    assert config["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 25 * 2**18,
                                           "allgather_bucket_size": 25 * 2**18, "contiguous_gradients": True,
                                           "overlap_comm": False}
    assert deepspeed_config(engine_setup(cfg, 0.3), 4, cuda=True)["zero_optimization"]["overlap_comm"] is True
    assert config["zero_allow_untested_optimizer"] is True and "optimizer" not in config

    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, name="adamw",
                                                                   adamw=AdamWHparams(beta2=0.95)),
                              train=dataclasses.replace(cfg.train, precision="bf16", grad_clip=0.0))
    config = deepspeed_config(engine_setup(cfg, 0.3), 2)
    assert config["bf16"] == {"enabled": True} and config["gradient_clipping"] == 0.0
    assert config["train_micro_batch_size_per_gpu"] == 256
    assert config["zero_optimization"]["reduce_bucket_size"] == 25 * 2**19  # bf16 elements
    assert "zero_allow_untested_optimizer" not in config
    assert config["optimizer"] == {"type": "AdamW", "params": {
        "lr": 0.3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "torch_adam": True, "fused": True}}  # AdamW is fused by default


@pytest.mark.timeout(300)
def test_trainer_runs_on_deepspeed(tmp_path):
    out = tmp_path / "run"
    assert launch(["run", "recipes/demo.yaml", "--nproc", "2", "engine=deepspeed", "max_steps=10",
                   "train.progress=false", "train.log_every=1", f"out={out}"]) == 0
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert len(acc.Scalars("train/loss")) == 10
    assert {"train/grad_norm", "optimizer/state_mib_per_rank", "val/top1"} <= tags
    assert any(t.startswith("vsgd/snr/") for t in tags)  # diagnostics at the last step
    assert (out / "checkpoints" / "step_00000010" / "__1_0.distcp").is_file()


@pytest.mark.timeout(300)
def test_trainer_runs_on_deepspeed_in_bf16_with_batchnorm(tmp_path):
    """bf16 parameters next to BatchNorm's running statistics (the demo's ResNet)."""
    out = tmp_path / "run"
    assert launch(["run", "recipes/demo.yaml", "--nproc", "2", "engine=deepspeed", "train.precision=bf16",
                   "max_steps=4", "train.progress=false", f"out={out}"]) == 0
    assert (out / "checkpoints" / "step_00000004" / "__1_0.distcp").is_file()
