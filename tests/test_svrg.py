"""alpha-SVRG (vsgd_dist/transforms/svrg.py): the formula, sharding, checkpoints, the trainer.

Tolerances (and why):
- least squares in float64 (full gradient in closed form), rtol 1e-12: the transform's
  arithmetic against the formula evaluated independently with numpy; only summation order
  differs (~1e-16 relative).
- sharded (zero stage 2 at 1, 2, 3 ranks; stage 1, ddp and fsdp2 at 2) against one process
  holding everything, rtol 1e-4 / atol 1e-6 after 8 steps: every rank's gradient is the
  mean of its slice of the batch, averaged over ranks, which rounds differently from one
  full-batch backward (~1e-7 relative), and VSGD's per-element normalisation carries it on.
- checkpoint layout 2 -> full -> 3 ranks and 2 -> ddp: BITWISE (gradients of small integers
  times 2**-6 average exactly at any world size; moving them is copying).
- the trainer (2 ranks, the digits demo): alpha0 = 0 against plain training, cached against
  vanilla (the pass reads the same batches the steps get), a stop mid-interval and resume
  against the uninterrupted run: BITWISE, losses and weights.
"""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from vsgd_dist.config import ConfigError, RunConfig, load_recipe
from vsgd_dist.engines.ownership import local_weights
from vsgd_dist.engines.sampling import WeightSampling
from vsgd_dist.train.engine_setup import engine_for
from vsgd_dist.train.engine_state import grad_state_full
from vsgd_dist.optim.ivon import IVONHparams
from vsgd_dist.spawn import run_distributed
from vsgd_dist.train.checkpoint import Checkpointer, latest_checkpoint, open_checkpoint
from vsgd_dist.transforms import GRADIENT_TRANSFORMS, AlphaSVRG, SVRGConfig

DEMO = "recipes/demo.yaml"


# ------------------------------------------------------------------ least squares, float64
def test_least_squares_correction_matches_the_formula_in_float64():
    """f_i(w) = (x_i.w - y_i)^2 / 2; F(w) = X^T (X w - y) / n in closed form. Over 3 epochs of 6
    batches (snapshot every epoch: alpha 0.75, 0.375, 0), every step's transformed gradient
    must equal g_B(w) - alpha (g_B(w~) - F(w~)) computed by hand, and the pass's full gradient
    F(w~)."""
    rng = np.random.default_rng(0)
    n, d, per_batch, epochs = 24, 5, 4, 3
    X, y = rng.normal(size=(n, d)), rng.normal(size=n)
    batches = [np.arange(i, i + per_batch) for i in range(0, n, per_batch)]
    steps_per_epoch = len(batches)

    cfg = RunConfig()
    cfg.engine.name, cfg.optim.name, cfg.optim.lr = "ddp", "sgd", 0.05
    model = nn.Linear(d, 1, bias=False).double()
    engine = engine_for(model, cfg, cfg.optim.lr)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)

    def gradient(idx):
        residual = model(Xt[idx]).squeeze(1) - yt[idx]
        engine.backward(0.5 * residual.square().mean())
        return engine.reduced_grads()

    svrg = AlphaSVRG(SVRGConfig(alpha0=0.75), engine=engine, gradient=gradient, total_steps=epochs * steps_per_epoch,
                     steps_per_epoch=steps_per_epoch, log_every=1)
    seen = []

    def grad_of(w, idx):
        return X[idx].T @ (X[idx] @ w - y[idx]) / len(idx)

    alphas = []
    for step in range(epochs * steps_per_epoch):
        epoch, b = divmod(step, steps_per_epoch)
        if b == 0:
            snapshot = model.weight.detach().reshape(-1).numpy().copy()
            svrg.prepare(step, epoch, lambda count: (batches[j] for j in range(count)))
            if svrg.full_grad is not None:
                assert np.allclose(svrg.full_grad[0].reshape(-1).numpy(), X.T @ (X @ snapshot - y) / n,
                                   rtol=1e-12, atol=1e-15)
        w = model.weight.detach().reshape(-1).numpy().copy()
        svrg.before_step(step, epoch, batches[b])
        grads = gradient(batches[b])
        svrg.apply(grads)  # what the trainer does before the step
        seen.append(grads[0].detach().reshape(-1).numpy().copy())
        engine.step()
        alpha = [0.75, 0.375, 0.0][epoch]
        alphas.append(svrg._alpha_step)
        full = X.T @ (X @ snapshot - y) / n
        expected = grad_of(w, batches[b]) - alpha * (grad_of(snapshot, batches[b]) - full)
        np.testing.assert_allclose(seen[-1], expected, rtol=1e-12, atol=1e-15)
        if alpha:
            assert not np.allclose(seen[-1], grad_of(w, batches[b]), rtol=1e-6)
    assert alphas == [0.75] * 6 + [0.375] * 6 + [0.0] * 6


def test_coefficient_schedule_end_epoch_and_recipe_errors():
    svrg = AlphaSVRG(SVRGConfig(alpha0=0.75, snapshot_every=10, end_epoch=2), engine=None, gradient=None,
                     total_steps=45, steps_per_epoch=20, log_every=1)
    assert svrg.snapshots == 5
    assert [svrg.coefficient(i) for i in range(5)] == pytest.approx([0.75, 0.5625, 0.375, 0.1875, 0.0], abs=0)
    assert not svrg._ended(1) and svrg._ended(2)
    assert AlphaSVRG(SVRGConfig(alpha0=0.5), engine=None, gradient=None, total_steps=7, steps_per_epoch=10,
                     log_every=1).coefficient(0) == 0.5  # one snapshot: alpha0 throughout
    assert not GRADIENT_TRANSFORMS.get("svrg").enabled(SVRGConfig())
    assert load_recipe(DEMO, ["svrg.alpha0=0.75", "mode=cached"]).svrg == SVRGConfig(alpha0=0.75, mode="cached")
    for overrides, message in [
            (["svrg.alpha0=1.5"], "svrg.alpha0=1.5 must be in [0, 1]"),
            (["svrg.alpha0=-0.1"], "svrg.alpha0=-0.1 must be in [0, 1]"),
            (["svrg.mode=cahced"], "svrg.mode='cahced' is not one of vanilla, cached; did you mean 'cached'?"),
            (["svrg.snapshot_every=-1"], "svrg.snapshot_every=-1 must be >= 0"),
            (["svrg.end_epoch=-2"], "svrg.end_epoch=-2 must be >= 0"),
            (["svrg.alpha0=0.75", "engine=deepspeed", "model.channels_last=false"],
             "not engine.name=deepspeed: DeepSpeed averages, clips and steps the gradient inside its own step"),
    ]:
        with pytest.raises(ConfigError, match=None) as e:
            load_recipe(DEMO, overrides)
        assert message in str(e.value) and "\n" not in str(e.value), (overrides, str(e.value))
    load_recipe(DEMO, ["engine=deepspeed", "model.channels_last=false"])  # svrg off: deepspeed is fine


# ------------------------------------------------------------------ engines, tiny model
GLOBAL_BATCH, STEPS, EVERY, STOP = 12, 8, 3, 5
BUCKET_MB = 256 / 2**20  # 64 fp32 elements per bucket: several buckets, each padded differently


def tiny_model() -> nn.Module:
    """170 parameters of odd shapes (no world size divides them)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(13, 7), nn.LayerNorm(7), nn.GELU(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))


def batch_of(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 13, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g)


class TinyRun:
    """What the trainer does with alpha-SVRG, for one rank on a tiny regression problem: each
    rank takes its slice of the step's global batch."""

    def __init__(self, rank, world, engine, mode="vanilla", stage=2, optimizer="vsgd"):
        self.rank, self.world = rank, world
        cfg = RunConfig()
        cfg.engine.name, cfg.engine.zero_stage, cfg.engine.bucket_mb = engine, stage, BUCKET_MB
        cfg.optim.name, cfg.optim.lr = optimizer, 0.05
        cfg.optim.ivon = IVONHparams(ess=50.0, hess_init=0.5, beta2=0.99, mc_samples=2)  # used by optimizer=ivon
        cfg.svrg = SVRGConfig(alpha0=0.75, snapshot_every=EVERY, mode=mode)
        self.cfg = cfg
        self.engine = engine_for(tiny_model(), cfg, cfg.optim.lr)
        self.sampling = WeightSampling(self.engine, cfg.train.grad_clip)
        self.svrg = AlphaSVRG(cfg.svrg, engine=self.engine, gradient=self.gradient, total_steps=STEPS,
                              steps_per_epoch=4, log_every=1)

    def mine(self, step):
        x, y = batch_of(step)
        per = GLOBAL_BATCH // self.world
        return x[self.rank * per:(self.rank + 1) * per], y[self.rank * per:(self.rank + 1) * per]

    def gradient(self, batch):
        x, y = batch
        self.engine.backward(nn.functional.mse_loss(self.engine.wrapped(x), y))
        return self.engine.reduced_grads()

    def train(self, start, stop):
        """Steps as the trainer runs them: per weight sample (IVON: 2, each corrected before its
        accumulation) a forward/backward, then the step."""
        for step in range(start, stop):
            self.svrg.prepare(step, 0, lambda count, s=step: (self.mine(s + i) for i in range(count)))
            self.svrg.before_step(step, 0, self.mine(step))
            for k in range(self.sampling.mc_samples):
                self.sampling.sample(k)
                self.gradient(self.mine(step))
                self.svrg.apply(self.engine.reduced_grads())  # what the trainer does before either
                if k + 1 < self.sampling.mc_samples:
                    self.sampling.accumulate()
            self.engine.step()
        self.sampling.mean_weights()
        return self

    def weights(self) -> dict:
        state = self.engine.model.state_dict()
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().numpy().copy()
                for k, v in state.items()}

    def save(self, folder, step):
        values, tensors = self.svrg.state_dict()
        Checkpointer(Path(folder), keep=1).save(self.engine, self.cfg, step=step, svrg=values,
                                                grad_state={f"svrg/{k}": v for k, v in tensors.items()})

    def resume(self, folder):
        loaded = Checkpointer(Path(folder), keep=1).load_latest(self.engine, self.cfg)
        tensors = {k.split("/", 1)[1]: v for k, v in loaded["grad_state"].items()}
        self.svrg.load_state_dict(loaded["svrg"], tensors, loaded["step"])
        return loaded["step"]


def exact_grads(model, rank):
    """Gradients of small integers times 2**-6, different per rank: averages are exact."""
    out = []
    for i, p in enumerate(model.parameters()):
        g = torch.Generator().manual_seed(1000 * rank + i)
        out.append(torch.randint(-64, 65, p.shape, generator=g).float() * 2.0**-6)
    return out


def layout_payload(rank, world, folder):
    """grad_state = this rank's part of the averaged exact gradient and of the weights, saved."""
    run = TinyRun(rank, world, "zero")
    for p, g in zip(run.engine.model.parameters(), exact_grads(run.engine.model, rank)):
        p.grad = g
    grads = [g.clone() for g in run.engine.reduced_grads()]
    Checkpointer(Path(folder), keep=1).save(run.engine, run.cfg, step=1, grad_state={
        "grad": grads, "weights": [w.clone() for w in local_weights(run.engine.ownership())]})
    run.engine.zero_grad()


def ranks_of_two(rank, world, root):
    runs = {"zero": TinyRun(rank, world, "zero").train(0, STEPS).weights(),
            "zero_stage1": TinyRun(rank, world, "zero", stage=1).train(0, STEPS).weights(),
            "ddp": TinyRun(rank, world, "ddp").train(0, STEPS).weights(),
            "fsdp2": TinyRun(rank, world, "fsdp2").train(0, STEPS).weights(),
            "zero_cached": TinyRun(rank, world, "zero", mode="cached").train(0, STEPS).weights(),
            "ivon_zero": TinyRun(rank, world, "zero", optimizer="ivon").train(0, STEPS).weights(),
            "ivon_ddp": TinyRun(rank, world, "ddp", optimizer="ivon").train(0, STEPS).weights()}
    TinyRun(rank, world, "zero").train(0, STOP).save(f"{root}/stopped", STOP)
    TinyRun(rank, world, "zero", mode="cached").train(0, STOP).save(f"{root}/stopped_cached", STOP)
    layout_payload(rank, world, f"{root}/layout")
    return runs


def resumed_elsewhere(rank, world, root):
    """Each rank count and engine resumes the 2-rank zero checkpoints written mid-interval."""
    runs = {"zero": TinyRun(rank, world, "zero").train(0, STEPS).weights(),
            "ivon_zero": TinyRun(rank, world, "zero", optimizer="ivon").train(0, STEPS).weights()}
    for engine in ("zero", "ddp"):
        for mode in ("vanilla", "cached"):
            run = TinyRun(rank, world, engine, mode=mode)
            step = run.resume(f"{root}/stopped" + ("_cached" if mode == "cached" else ""))
            runs[f"resumed_{engine}_{mode}"] = run.train(step, STEPS).weights()
    # the exact gradient average saved at 2 ranks, in this run's layout
    run = TinyRun(rank, world, "zero")
    loaded = Checkpointer(Path(f"{root}/layout"), keep=1).load_latest(run.engine, run.cfg)["grad_state"]
    expected = [sum(gs) / 2 for gs in zip(*(exact_grads(run.engine.model, r) for r in range(2)))]
    for p, g in zip(run.engine.model.parameters(), expected):
        p.grad = g.clone()  # every rank the same: the average is itself
    runs["layout_equal"] = all(torch.equal(a, b) for a, b in zip(loaded["grad"], run.engine.reduced_grads()))
    runs["weights_equal"] = all(torch.equal(a, b) for a, b in zip(loaded["weights"], local_weights(run.engine.ownership())))
    return runs


@pytest.mark.timeout(300)
def test_sharded_engines_equal_one_process_and_checkpoints_reshard(tmp_path):
    two = run_distributed(ranks_of_two, 2, str(tmp_path))[0]
    one = run_distributed(resumed_elsewhere, 1, str(tmp_path))[0]
    three = run_distributed(resumed_elsewhere, 3, str(tmp_path))[0]

    # The full gradient state of the 2-rank checkpoint, put together offline: exact.
    meta, read = open_checkpoint(latest_checkpoint(tmp_path / "layout"))
    full = grad_state_full(lambda r: read(r)["engine"], meta)
    model = tiny_model()
    expected = [sum(gs) / 2 for gs in zip(*(exact_grads(model, r) for r in range(2)))]
    for (name, p), g in zip(model.named_parameters(), expected):
        assert torch.equal(full["grad"][name], g), name
        assert torch.equal(full["weights"][name], p.detach()), name
    assert one["layout_equal"] and one["weights_equal"] and three["layout_equal"] and three["weights_equal"]

    # One process holding everything (zero at 1 rank) is the reference; IVON's (2 weight
    # samples a step, its noise the same at any world size) that of IVON.
    for label, weights in {"2 ranks zero": two["ivon_zero"], "2 ranks ddp": two["ivon_ddp"],
                           "3 ranks zero": three["ivon_zero"]}.items():
        for name, value in one["ivon_zero"].items():
            np.testing.assert_allclose(weights[name], value, rtol=1e-4, atol=1e-6, err_msg=f"IVON {label} {name}")
    reference = one["zero"]
    runs = {**{f"2 ranks {k}": v for k, v in two.items() if not k.startswith("ivon")}, "3 ranks zero": three["zero"],
            **{f"1 rank {k}": v for k, v in one.items() if k.startswith("resumed")},
            **{f"3 ranks {k}": v for k, v in three.items() if k.startswith("resumed")}}
    for label, weights in runs.items():
        for name, value in reference.items():
            np.testing.assert_allclose(weights[name], value, rtol=1e-4, atol=1e-6, err_msg=f"{label} {name}")


# ------------------------------------------------------------------ the trainer
def trainer_runs(rank, world, root):
    """Several trainer runs in the same 2 processes (the data pipeline compiles once)."""
    from vsgd_dist.train.trainer import Trainer

    common = ["train.progress=false", "train.log_every=1", "train.ckpt_every=0", "max_steps=12"]
    svrg = ["svrg.alpha0=0.75", "svrg.snapshot_every=5"]
    runs = [("plain", []), ("alpha0_0", ["svrg.alpha0=0", "svrg.mode=cached"]), ("vanilla", svrg),
            ("cached", svrg + ["svrg.mode=cached"]), ("stopped", svrg + ["train.stop_at=7"]), ("stopped", svrg)]
    weights, seconds = {}, {}
    for name, overrides in runs:
        start = time.perf_counter()
        trainer = Trainer(load_recipe(DEMO, [f"out={root}/{name}", *common, *overrides], world_size=world))
        result = trainer.run()
        weights[name] = {k: v.detach().numpy().copy() for k, v in trainer.engine.model.state_dict().items()}
        seconds[name] = time.perf_counter() - start
        assert result["status"] == ("stopped" if "train.stop_at=7" in overrides else "completed")
    return weights, seconds


def scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


@pytest.mark.timeout(400)
def test_trainer_bitwise_modes_resume_variance_and_report(tmp_path):
    weights, seconds = run_distributed(trainer_runs, 2, str(tmp_path), timeout=380)[0]
    print("seconds per run:", {k: round(v, 1) for k, v in seconds.items()})

    def same(a, b):
        return (scalars(tmp_path / a, "train/loss") == scalars(tmp_path / b, "train/loss")
                and all(np.array_equal(weights[a][k], weights[b][k]) for k in weights[a]))

    assert same("alpha0_0", "plain"), "svrg.alpha0=0 must train exactly as without the section"
    assert not scalars(tmp_path / "alpha0_0", "svrg/alpha")
    assert same("cached", "vanilla"), "the pass must read the batches the steps get"
    assert same("stopped", "vanilla"), "a resume mid-interval (step 7 of [5, 10)) must be bitwise"
    assert not same("vanilla", "plain")

    alpha = dict(scalars(tmp_path / "vanilla", "svrg/alpha"))
    assert [alpha[s] for s in range(1, 13)] == [0.75] * 5 + [0.375] * 5 + [0.0] * 2  # 3 snapshots, linspace
    plain_var = dict(scalars(tmp_path / "vanilla", "svrg/grad_var"))
    corrected = dict(scalars(tmp_path / "vanilla", "svrg/grad_var_corrected"))
    assert sorted(plain_var) == list(range(1, 11))
    # Early in training (the first interval) the correction lowers the gradient's variance.
    assert all(corrected[s] < plain_var[s] for s in range(1, 6)), (plain_var, corrected)
    assert {s for s, _ in scalars(tmp_path / "vanilla", "svrg/grad_var_snapshot")} == {1, 6}
    # Extra forward/backward passes: a pass of 5 steps per interval, and in vanilla mode the
    # snapshot's on each step but the first (whose gradient the pass already has).
    extra = dict(scalars(tmp_path / "vanilla", "svrg/extra_steps"))
    assert [extra[s] for s in (1, 2, 5, 6, 10, 12)] == [5, 6, 9, 14, 18, 18]
    assert dict(scalars(tmp_path / "cached", "svrg/extra_steps"))[12] == 10
    assert scalars(tmp_path / "stopped", "svrg/extra_steps") == scalars(tmp_path / "vanilla", "svrg/extra_steps")
    state = dict(scalars(tmp_path / "vanilla", "svrg/state_mib"))
    cached = dict(scalars(tmp_path / "cached", "svrg/state_mib"))
    assert state[1] > 0 and cached[1] > state[1] and state[12] == 0

    from launch.__main__ import main as launch

    assert launch(["compare", str(tmp_path / "plain"), str(tmp_path / "vanilla"), "--out", str(tmp_path / "r")]) == 0
    report = (tmp_path / "r" / "report.md").read_text()
    assert "| vsgd (zero, resnet_tiny, lr 0.01) | 1 |" in report
    assert "| vsgd + alpha-SVRG 0.75 (zero, resnet_tiny, lr 0.01) | 1 |" in report
    assert "| final train loss | train loss at 12 steps' compute |" in report  # the plain run's budget
    assert (tmp_path / "r" / "train_loss_equal_compute.png").stat().st_size > 5000

    # The stopped run's checkpoint (step 7, mid-interval) consolidated offline holds the state by name.
    step_7 = tmp_path / "stopped" / "checkpoints" / "step_00000007"
    assert launch(["checkpoint", "convert", str(step_7), "--out", str(tmp_path / "c.pt")]) == 0
    consolidated = torch.load(tmp_path / "c.pt", weights_only=True)
    assert consolidated["step"] == 7 and set(consolidated["grad_state"]) == {"svrg/full_grad", "svrg/snapshot"}
    for key in ("svrg/full_grad", "svrg/snapshot"):
        assert {k: v.shape for k, v in consolidated["grad_state"][key].items()} == {
            k: v.shape for k, v in consolidated["model"].items() if k in consolidated["optimizer"]}
