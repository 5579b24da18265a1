"""IVON through the engines (native ZeRO stage 1/2, FSDP2, DDP), checkpoints and the trainer,
on real gloo ranks, against the single-process optimizer.

Tolerances (and why):
- optimizer level, BITWISE: every rank's gradient of every weight sample is a small integer
  times 2**-6 that does not depend on the weights, so its average over ranks is exact in any
  order (test_zero.py's trick). Then the weight samples m_w + eps (the noise drawn by ZeRO
  shards, FSDP2 DTensor shards, DDP replicas: the same at every world size) and the weights
  after every step must equal the single process's bit for bit, mc_samples 1 and 2.
- end to end (a real model, every rank a slice of the batch, gradients at the weight
  samples), rtol/atol 1e-4: the averaged gradient rounds differently from one full-batch
  backward (~1e-7 relative); 10 steps carry it through m, h and the next samples.
- diagnostics, rtol 1e-5: per-layer sums are added over shards in another order.
- resharding 2 -> 3 and 3 -> 2 (every engine, and across engines), BITWISE: every rank sees
  the same exact gradient, so nothing depends on the world size; the noise continues from the
  saved step counters and seed.
- BatchNorm: bitwise against the same forwards run by hand (what happens, stated in
  `check_batchnorm`).
- the trainer: a resume at the same world size repeats the losses bit for bit.
- the digits demo, seed 0: IVON's top-1 >= AdamW's - 0.01. Its posterior predictive
  is NOT better calibrated there (underconfident models; see that test): what is tested is
  predictive confidence < mean confidence < accuracy.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch.__main__ import main as launch
from vsgd_dist.config import RunConfig
from vsgd_dist.engines.ownership import state_bytes, state_pieces
from vsgd_dist.engines.sampling import WeightSampling
from vsgd_dist.optim import named_param_groups
from vsgd_dist.optim.diagnostics import reduced_diagnostics
from vsgd_dist.optim.ivon import DIAGNOSTICS, IVONHparams
from vsgd_dist.spawn import run_distributed
from vsgd_dist.train.checkpoint import Checkpointer, latest_checkpoint, read_full
from vsgd_dist.train.engine_setup import engine_for, engine_setup

pytestmark = pytest.mark.dist

STEPS = 8
LR = 0.05
WEIGHT_DECAY = 0.1
BATCH = 12  # divisible by 1 to 4 ranks
ENGINES = {"zero1": ("zero", 1), "zero2": ("zero", 2), "fsdp2": ("fsdp2", 2), "ddp": ("ddp", 2)}


def make_cfg(engine: str, mc_samples: int = 1) -> RunConfig:
    cfg = RunConfig()
    cfg.optim.name, cfg.optim.weight_decay = "ivon", WEIGHT_DECAY
    # A small ess and a fast beta2, so that sigma is large and h moves within a few steps.
    cfg.optim.ivon = IVONHparams(ess=50.0, hess_init=0.5, beta2=0.99, mc_samples=mc_samples)
    cfg.engine.name, cfg.engine.zero_stage = ENGINES[engine]
    cfg.engine.bucket_mb = 256 / 2**20  # 64 fp32 elements: several buckets, parameters cut across ranks
    cfg.train.seed = 3
    return cfg


def make_model(seed: int = 0) -> nn.Module:
    """Odd shapes: 170 parameters; FSDP2 splits dim 0 of 7, 5, 3 unevenly (empty at 4 ranks)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 7), nn.LayerNorm(7), nn.GELU(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))


def engine_and_reference(engine_name: str, mc_samples: int = 1, model=make_model):
    """An engine over one model and the unsharded IVON (same kwargs) over an identical one."""
    cfg = make_cfg(engine_name, mc_samples)
    engine = engine_for(model(), cfg, LR)
    reference = model()
    setup = engine_setup(cfg, LR)
    ref_opt = setup.optimizer.optimizer_class(named_param_groups(reference, WEIGHT_DECAY), **setup.optimizer_kwargs())
    return engine, reference, ref_opt


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` laid out as `param` (a DTensor shard for FSDP2)."""
    if isinstance(param, DTensor):
        return distribute_tensor(value, param.device_mesh, param.placements)
    return value.clone()


def exact_grads(shapes, step: int, rank: int) -> list[torch.Tensor]:
    """Integers times 2**-6: sums over ranks are exact in any order."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randint(-64, 65, s, generator=g).float() * 2.0**-6 for s in shapes]


def warmup(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))


# ---------------------------------------------------------------- optimizer level, bitwise
def check_bitwise(rank, world, engine_name, mc_samples):
    engine, reference, ref_opt = engine_and_reference(engine_name, mc_samples)
    schedules = [warmup(engine.optimizer), warmup(ref_opt)]
    params, ref_params = list(engine.model.parameters()), list(reference.parameters())
    shapes = [q.shape for q in ref_params]
    assert WeightSampling(engine).mc_samples == mc_samples
    for step in range(STEPS):
        for k in range(mc_samples):
            WeightSampling(engine).sample(k)
            ref_opt.sample(k)
            for p, q in zip(params, ref_params):  # the same noise at every world size
                assert torch.equal(full(p), q), (engine_name, step, k)
            per_rank = [exact_grads(shapes, 10 * step + k, r) for r in range(world)]
            average = [sum(g) / world for g in zip(*per_rank)]
            if engine_name == "zero2":  # through the backward hooks' reduce-scatter
                engine.backward(sum((p * g).sum() for p, g in zip(params, per_rank[rank])))
            else:
                for p, g in zip(params, average):
                    p.grad = like(p, g)
            for q, g in zip(ref_params, average):
                q.grad = g.clone()
            if k + 1 < mc_samples:
                WeightSampling(engine).accumulate()
                ref_opt.accumulate()
        engine.step()
        ref_opt.step()
        ref_opt.zero_grad()
        for schedule in schedules:
            schedule.step()
    WeightSampling(engine).mean_weights()  # ZeRO: the mean's all-gather was left to the next sample
    for p, q in zip(params, ref_params):
        assert torch.equal(full(p), q), engine_name
    return engine, reference, ref_opt


def check_diagnostics(engine, reference, ref_opt):
    names = {q: n for n, q in reference.named_parameters()}
    layer_of = {n: n.split(".")[0] for n in names.values()}
    ref_pieces = ((names[q], *(ref_opt.state[q][k] for k in DIAGNOSTICS.state_keys), g)
                  for g in ref_opt.param_groups for q in g["params"])
    own = engine.ownership()
    sharded, hist = reduced_diagnostics(DIAGNOSTICS, state_pieces(own, DIAGNOSTICS.state_keys), layer_of.get,
                                        reduce=own.sharded_state, device=torch.device("cpu"))
    expected, ref_hist = reduced_diagnostics(DIAGNOSTICS, ref_pieces, layer_of.get, reduce=False,
                                             device=torch.device("cpu"))
    assert sharded.keys() == expected.keys() == set(layer_of.values())
    for layer, stats in expected.items():
        for stat, value in stats.items():
            assert sharded[layer][stat] == pytest.approx(value, rel=1e-5), (layer, stat)
    for stat in hist:
        assert torch.equal(hist[stat], ref_hist[stat]), stat


def check_state_bytes(engine, ref_opt, world):
    """IVON keeps m and h: 8 bytes per fp32 parameter, 1/W of them per ZeRO rank (+ padding)."""
    unsharded = sum(v.nbytes for s in ref_opt.state.values() for v in s.values() if v.dim() > 0)
    assert unsharded == 8 * 170
    padding = sum(b.padded_numel - b.numel for b in engine.optimizer.buckets)
    assert world * state_bytes(engine.ownership()) == unsharded + 8 * padding


def bitwise_suite(rank, world):
    for engine_name in ENGINES:
        for mc_samples in (1, 2):
            engine, reference, ref_opt = check_bitwise(rank, world, engine_name, mc_samples)
        check_diagnostics(engine, reference, ref_opt)
        if engine_name.startswith("zero"):
            check_state_bytes(engine, ref_opt, world)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_engines_draw_the_same_noise_and_match_the_single_process_bitwise(world_size):
    run_distributed(bitwise_suite, world_size, timeout=280)


# ------------------------------------------------------------------------ end to end
def check_end_to_end(rank, world, engine_name, mc_samples):
    """Every rank trains on its slice of a global batch at the weight samples; equals the
    full-batch single process. Then evaluation samples reach the forward (FSDP2's
    all-gather, ZeRO's) and mean_weights() brings back the mean."""
    engine, reference, ref_opt = engine_and_reference(engine_name, mc_samples)
    g = torch.Generator().manual_seed(7)
    mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for _ in range(10):
        x, y = torch.randn(BATCH, 13, generator=g), torch.randn(BATCH, 3, generator=g)
        for k in range(mc_samples):
            WeightSampling(engine).sample(k)
            ref_opt.sample(k)
            engine.backward(nn.functional.mse_loss(engine.wrapped(x[mine]), y[mine]))
            nn.functional.mse_loss(reference(x), y).backward()
            if k + 1 < mc_samples:
                WeightSampling(engine).accumulate()
                ref_opt.accumulate()
        engine.step()
        ref_opt.step()
        ref_opt.zero_grad()
    WeightSampling(engine).mean_weights()
    for p, q in zip(engine.model.parameters(), reference.parameters()):
        torch.testing.assert_close(full(p), q, rtol=1e-4, atol=1e-4)

    with torch.no_grad():
        engine.model.eval()
        at_mean = engine.wrapped(x)
        WeightSampling(engine).sample(1, evaluation=True)
        ref_opt.sample(1, evaluation=True)
        sampled = engine.wrapped(x)
        torch.testing.assert_close(sampled, reference(x), rtol=1e-4, atol=1e-4)
        assert (sampled - at_mean).abs().max() > 1e-3  # the sample reached the forward
        WeightSampling(engine).mean_weights()
        ref_opt.restore()
        assert torch.equal(engine.wrapped(x), at_mean)


def end_to_end_suite(rank, world):
    for engine_name in ENGINES:
        check_end_to_end(rank, world, engine_name, mc_samples=2 if engine_name in ("zero2", "fsdp2") else 1)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [2, 3])
def test_engines_train_at_weight_samples_like_the_single_process(world_size):
    run_distributed(end_to_end_suite, world_size, timeout=280)


# ------------------------------------------------------------------------- BatchNorm
def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def check_batchnorm(rank, world):
    """What BatchNorm does under IVON: every training forward runs at a weight sample, so
    its running statistics are updated from the activations of the samples (mc_samples
    updates per step), as in the authors' code; evaluation, at the mean or at posterior
    samples, uses those statistics. Checked against a shadow model that runs the same
    forwards at copies of the sampled weights, and against one that runs them at the mean."""
    engine, _, _ = engine_and_reference("zero2", mc_samples=2, model=bn_model)
    shadow, at_mean = bn_model(), bn_model()
    g = torch.Generator().manual_seed(5)
    mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)

    @torch.no_grad()
    def forward_at_engine_weights(model, x):
        for p, q in zip(engine.model.parameters(), model.parameters()):
            q.copy_(p)
        model(x)

    for _ in range(3):
        x = torch.randn(BATCH, 13, generator=g)[mine]
        WeightSampling(engine).mean_weights()
        for _ in range(2):
            forward_at_engine_weights(at_mean, x)
        for k in range(2):
            WeightSampling(engine).sample(k)
            forward_at_engine_weights(shadow, x)
            engine.backward(engine.wrapped(x).square().mean())
            if k == 0:
                WeightSampling(engine).accumulate()
        engine.step()
    bn = engine.model[1]
    assert int(bn.num_batches_tracked) == 3 * 2
    assert torch.equal(bn.running_mean, shadow[1].running_mean)
    assert torch.equal(bn.running_var, shadow[1].running_var)
    assert not torch.allclose(bn.running_mean, at_mean[1].running_mean, rtol=0, atol=1e-3)


@pytest.mark.timeout(120)
def test_batchnorm_running_statistics_come_from_the_weight_samples():
    run_distributed(check_batchnorm, 2, timeout=100)


# ----------------------------------------------------------------------- checkpoints
FIRST, THEN = 3, 3
# (written by, loaded into) at 2 -> 3 and 3 -> 2 ranks: every engine itself, and across engines.
RESHARD = [(e, e) for e in ENGINES] + [("zero2", "fsdp2"), ("fsdp2", "ddp"), ("ddp", "zero1"), ("zero1", "zero2")]


def identical_steps(engine, first: int, steps: int) -> None:
    """The same exact gradient on every rank: the run cannot depend on the world size."""
    params = list(engine.model.parameters())
    shapes = [full(p).shape for p in params]
    for step in range(first, first + steps):
        for k in range(WeightSampling(engine).mc_samples):
            WeightSampling(engine).sample(k)
            for p, g in zip(params, exact_grads(shapes, 10 * step + k, 0)):
                p.grad = like(p, g)
            if k + 1 < WeightSampling(engine).mc_samples:
                WeightSampling(engine).accumulate()
        engine.step()


def full_params(engine) -> list[np.ndarray]:
    """As numpy arrays: tensors leave a rank process as shared-memory handles that die with it."""
    WeightSampling(engine).mean_weights()
    return [full(p).detach().numpy().copy() for p in engine.model.parameters()]


def save_all(rank, world, folder):
    """Per engine: FIRST steps, a checkpoint, THEN more steps (the uninterrupted reference)."""
    out = {}
    for name in ENGINES:
        cfg = make_cfg(name, mc_samples=2)
        engine = engine_for(make_model(), cfg, LR)
        identical_steps(engine, 0, FIRST)
        Checkpointer(Path(folder) / name, keep=1).save(engine, cfg, step=FIRST)
        identical_steps(engine, FIRST, THEN)
        out[name] = full_params(engine)
    return out


def load_all(rank, world, folder, folder_out):
    """Load each checkpoint into a fresh engine (other initial weights), write it again at
    this world size, and continue THEN steps."""
    out = {}
    for written_by, name in RESHARD:
        cfg = make_cfg(name, mc_samples=2)
        engine = engine_for(make_model(seed=1), cfg, LR)
        assert Checkpointer(Path(folder) / written_by, keep=1).load_latest(engine, cfg)["step"] == FIRST
        Checkpointer(Path(folder_out) / f"{written_by}-{name}", keep=1).save(engine, cfg, step=FIRST)
        identical_steps(engine, FIRST, THEN)
        out[(written_by, name)] = full_params(engine)
    return out


def full_of(folder: Path) -> dict:
    return read_full(latest_checkpoint(folder))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("pair", [(2, 3), (3, 2)], ids=lambda p: f"{p[0]}to{p[1]}")
def test_ivon_state_reshards_across_world_sizes_and_engines_and_continues_exactly(pair, tmp_path):
    n, m = pair
    reference = run_distributed(save_all, n, str(tmp_path / "saved"), timeout=280)[0]
    resumed = run_distributed(load_all, m, str(tmp_path / "saved"), str(tmp_path / "again"), timeout=280)[0]
    for written_by, name in RESHARD:
        for a, b in zip(resumed[(written_by, name)], reference[written_by]):
            assert np.array_equal(a, b), (written_by, name)
        saved, again = full_of(tmp_path / "saved" / written_by), full_of(tmp_path / "again" / f"{written_by}-{name}")
        assert saved["optimizer"].keys() == again["optimizer"].keys() == {n for n, _ in make_model().named_parameters()}
        for param, state in saved["optimizer"].items():
            assert set(state) == {"m", "h", "step"}
            assert int(state["step"]) == FIRST
            for key in ("m", "h"):
                assert torch.equal(state[key], again["optimizer"][param][key]), (written_by, name, param, key)
        assert [g["seed"] for g in again["param_groups"]] == [3, 3]


# --------------------------------------------------------------------------- trainer
DEMO = ["recipes/demo.yaml", "optimizer=ivon", "train.progress=false", "train.log_every=1"]


def demo_run(out, *overrides, nproc=2) -> int:
    return launch(["run", *DEMO, "--nproc", str(nproc), f"out={out}", *overrides])


def scalars(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def values(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.mark.timeout(900)
def test_trainer_logs_ivon_metrics_fills_in_ess_and_resumes_bitwise(tmp_path):
    short = ["max_steps=12", "train.global_batch=48", "train.diag_every=6", "train.val_mc_samples=3",
             "optim.ivon.mc_samples=2", "optim.ivon.ess=0"]
    assert demo_run(tmp_path / "whole", *short) == 0
    assert demo_run(tmp_path / "resumed", *short, "train.stop_at=6") == 0
    assert demo_run(tmp_path / "resumed", *short) == 0
    whole, resumed = scalars(tmp_path / "whole"), scalars(tmp_path / "resumed")
    assert values(resumed, "train/loss") == values(whole, "train/loss") and len(values(whole, "train/loss")) == 12
    tags = set(whole.Tags()["scalars"])
    for prefix in ("val/", "val/predictive_"):
        assert {f"{prefix}{m}" for m in ("top1", "top5", "nll", "ece")} <= tags
    assert {"ivon/posterior_std/head", "ivon/hessian/stem.0"} <= tags
    assert {"ivon_hist/posterior_std", "ivon_hist/hessian"} <= set(whole.Tags()["histograms"])
    full = read_full(latest_checkpoint(tmp_path / "whole" / "checkpoints"))
    meta, groups = full["meta"], full["param_groups"]
    assert [g["ess"] for g in groups] == [1500.0, 1500.0]  # ess=0: the digits' training images
    assert [g["mc_samples"] for g in groups] == [2, 2] and meta["step"] == 12
    assert launch(["compare", str(tmp_path / "whole"), "--out", str(tmp_path / "report")]) == 0
    assert "| ECE (%) | predictive top-1 | predictive NLL | predictive ECE (%) |" in (
        tmp_path / "report" / "report.md").read_text()


def test_deepspeed_refuses_ivon_before_any_process_starts(tmp_path, capsys):
    assert demo_run(tmp_path / "r", "engine=deepspeed") == 2
    err = capsys.readouterr().err
    assert "optimizer ivon runs on the engines ddp, zero, fsdp2, not engine.name=deepspeed" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


# ----------------------------------------------------------------------- the demo
@pytest.mark.timeout(900)
def test_demo_ivon_trains_like_adamw_and_its_predictive_is_less_confident(tmp_path):
    """The digits demo at its recipe's values, seed 0 (the 3-seed comparison with confidence
    intervals is scripts/compare.sh's, in README). IVON's top-1 is at least AdamW's minus one
    point. The issue also asks for a posterior predictive with a lower ECE than the mean
    prediction: measured, that does not hold here (README): after 300 steps every model is
    underconfident (its mean top-1 probability is below its accuracy; AdamW too, with or
    without label smoothing), and averaging the softmax over weight samples lowers the
    confidence further, so ECE rises. What holds, and is tested: predictive confidence <
    mean confidence < accuracy."""
    final = {}
    for opt in ("ivon", "adamw"):
        out = tmp_path / opt
        assert launch(["run", "recipes/demo.yaml", "--nproc", "2", f"optimizer={opt}", "seed=0", f"out={out}",
                       "train.progress=false"]) == 0
        acc = scalars(out)
        final[opt] = {tag: values(acc, tag)[300] for tag in acc.Tags()["scalars"] if tag.startswith("val/")}
    ivon = final["ivon"]
    assert ivon["val/top1"] >= final["adamw"]["val/top1"] - 0.01, final
    assert ivon["val/predictive_confidence"] < ivon["val/confidence"] < ivon["val/top1"], ivon
    assert math.isfinite(ivon["val/predictive_nll"]) and ivon["val/predictive_top1"] > 0.9, ivon
