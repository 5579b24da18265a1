"""alpha-SVRG (vsgd_dist/transforms/svrg.py): the formula, sharding, checkpoints, the trainer.

Tolerances (and why):
- least squares in float64 (full gradient in closed form), rtol 1e-12: the transform's
  arithmetic against the formula evaluated independently with numpy; only summation order
  differs (~1e-16 relative).
- against the authors' update (written from their description: a second model for the
  snapshot, the full gradient over the epoch, their per-epoch intervals of alpha, their
  svrg_end, BatchNorm and dropout), float64, rtol 1e-12: the same operations on the same
  draws, only the order of a few sums differs.
- sharded (zero stage 2 at 1, 2, 3 ranks; stage 1, ddp and fsdp2 at 2) against one process
  holding everything, rtol 1e-4 / atol 1e-6 after 8 steps: every rank's gradient is the
  mean of its slice of the batch, averaged over ranks, which rounds differently from one
  full-batch backward (~1e-7 relative), and VSGD's per-element normalisation carries it on.
- checkpoint layout 2 -> full -> 3 ranks and 2 -> ddp: BITWISE (gradients of small integers
  times 2**-6 average exactly at any world size; moving them is copying).
- the trainer (2 ranks, the digits demo, zero and fsdp2): alpha0 = 0 against plain training,
  cached against vanilla (the pass reads the same batches the steps get), a stop mid-interval
  and resume against the uninterrupted run: BITWISE, losses and weights.
"""
from __future__ import annotations

import ast
import copy
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
from vsgd_dist.optim.ivon import IVONHparams
from vsgd_dist.spawn import run_distributed
from vsgd_dist.train.checkpoint import Checkpointer, latest_checkpoint, read_full
from vsgd_dist.train.engine_setup import engine_for
from vsgd_dist.transforms import GRADIENT_TRANSFORMS, AlphaSVRG, SVRGConfig, TransformContext

DEMO = "recipes/demo.yaml"


# ------------------------------------------------------------------ least squares, float64
def context(engine, gradient, epochs_batches, total_steps, steps_per_epoch, seed=0, log_every=1):
    """What the trainer hands a transform, for a problem whose step s reads `epochs_batches(s)`."""
    def read_steps(epoch, first, count):
        last = min(first + count, steps_per_epoch)
        return (epochs_batches(epoch * steps_per_epoch + b) for b in range(first, last))

    return TransformContext(engine=engine, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                            log_every=log_every, seed=seed, gradient=gradient, read_steps=read_steps)


def drive(transform, engine, gradient, batch_of_step, total_steps, steps_per_epoch, after_step=None, seen=None):
    """The trainer's calls, in its order: `before_steps` at each epoch start and when its count
    runs out, `before_step`, forward/backward, `apply` to the averaged gradient, the engine's
    step. `seen` collects each step's gradient as the step receives it."""
    due = 0
    for step in range(total_steps):
        epoch = step // steps_per_epoch
        if step % steps_per_epoch == 0 or step == due:
            due = step + transform.before_steps(step, epoch)
        transform.before_step(step, epoch, batch_of_step(step))
        grads = gradient(batch_of_step(step))
        transform.apply(grads)
        if seen is not None:
            seen.append(grads[0].detach().reshape(-1).numpy().copy())
        engine.step()
        if after_step is not None:
            after_step(step)


@pytest.mark.parametrize("snapshot_every", [0, 4])
def test_least_squares_correction_matches_the_formula_in_float64(snapshot_every):
    """f_i(w) = (x_i.w - y_i)^2 / 2; F(w) = X^T (X w - y) / n in closed form. Over 3 epochs of 6
    batches, every step's transformed gradient must equal g_B(w) - alpha (g_B(w~) - F(w~))
    computed by hand, and the pass's full gradient F(w~) over the whole data set, also when
    snapshots come every 4 steps (snapshots at steps 0 and 4 of each epoch: the mean over the
    epoch's 6 batches, not over the interval's)."""
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

    total = epochs * steps_per_epoch
    svrg = AlphaSVRG(SVRGConfig(alpha0=0.75, snapshot_every=snapshot_every),
                     context(engine, gradient, lambda s: batches[s % steps_per_epoch], total, steps_per_epoch))
    seen = []

    def grad_of(w, idx):
        return X[idx].T @ (X[idx] @ w - y[idx]) / len(idx)

    every = snapshot_every or steps_per_epoch
    alphas = np.linspace(0.75, 0, epochs * -(-steps_per_epoch // every))
    weights_before = [model.weight.detach().reshape(-1).numpy().copy()]  # step s starts from [s]

    def check(step):
        epoch, b = divmod(step, steps_per_epoch)
        snapshot = weights_before[epoch * steps_per_epoch + b // every * every]
        alpha = alphas[epoch * -(-steps_per_epoch // every) + b // every]
        full = X.T @ (X @ snapshot - y) / n
        if alpha:
            np.testing.assert_allclose(svrg.full_grad[0].reshape(-1).numpy(), full, rtol=1e-12, atol=1e-15)
        w = weights_before[step]
        expected = grad_of(w, batches[b]) - alpha * (grad_of(snapshot, batches[b]) - full)
        np.testing.assert_allclose(seen[-1], expected, rtol=1e-12, atol=1e-15)
        if alpha:
            assert not np.allclose(seen[-1], grad_of(w, batches[b]), rtol=1e-6)
        weights_before.append(model.weight.detach().reshape(-1).numpy().copy())

    drive(svrg, engine, gradient, lambda s: batches[s % steps_per_epoch], total, steps_per_epoch, after_step=check,
          seen=seen)
    assert len(seen) == total


def schedule_only(cfg: SVRGConfig, total_steps: int, steps_per_epoch: int) -> AlphaSVRG:
    return AlphaSVRG(cfg, context(None, None, None, total_steps, steps_per_epoch))


def authors_alpha(alpha0: float, epochs: int, steps_per_epoch: int, every: int) -> list[float]:
    """The authors' schedule, from their description: each epoch is cut into intervals of
    `every` steps starting at its first step (the last one shorter), and the intervals of the
    whole run take linspace(alpha0, 0, their number) in order."""
    starts = list(range(0, steps_per_epoch, min(every, steps_per_epoch)))
    points = np.linspace(alpha0, 0.0, epochs * len(starts))
    return [float(points[epoch * len(starts) + sum(s <= b for s in starts) - 1])
            for epoch in range(epochs) for b in range(steps_per_epoch)]


def test_the_coefficient_restarts_its_intervals_every_epoch_as_the_authors_do():
    """An interval of 4 steps in epochs of 6: snapshots at steps 0 and 4 of every epoch (the
    last interval of an epoch 2 steps), 2 x epochs points of linspace; intervals=run counts
    them across epoch ends instead."""
    for every, epochs in [(4, 5), (4, 1), (6, 3), (9, 2), (1, 2)]:
        svrg = schedule_only(SVRGConfig(alpha0=0.75, snapshot_every=every), epochs * 6, 6)
        ours = [svrg.coefficient(svrg.interval_of(step)[0]) for step in range(epochs * 6)]
        assert ours == authors_alpha(0.75, epochs, 6, every), (every, epochs)
    svrg = schedule_only(SVRGConfig(alpha0=0.75, snapshot_every=4), 30, 6)
    assert [svrg.interval_of(s) for s in (0, 3, 4, 5, 6, 10, 11, 29)] == [
        (0, 4), (0, 4), (1, 6), (1, 6), (2, 10), (3, 12), (3, 12), (9, 30)]
    over_run = schedule_only(SVRGConfig(alpha0=0.75, snapshot_every=4, intervals="run"), 30, 6)
    assert over_run.snapshots == 8 and [over_run.interval_of(s) for s in (0, 4, 5, 6, 8, 29)] == [
        (0, 4), (1, 8), (1, 8), (1, 8), (2, 12), (7, 30)]
    a_run = schedule_only(SVRGConfig(alpha0=0.75, snapshot_every=10, intervals="run"), 45, 20)
    assert a_run.snapshots == 5
    assert [a_run.coefficient(i) for i in range(5)] == pytest.approx([0.75, 0.5625, 0.375, 0.1875, 0.0], abs=0)


def test_end_epoch_maps_to_the_authors_svrg_end_plus_one_and_says_so():
    """The authors keep the correction while epoch <= svrg_end (epochs from 0); end_epoch = E
    stops it from epoch E on, so their svrg_end = N is end_epoch = N + 1, which the key's
    docstring and docs/alpha-svrg.md state."""
    source = Path("vsgd_dist/transforms/svrg.py").read_text()
    tree = ast.parse(source)
    config = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SVRGConfig")
    docs = {config.body[i].target.id: config.body[i + 1].value.value for i in range(len(config.body) - 1)
            if isinstance(config.body[i], ast.AnnAssign) and isinstance(config.body[i + 1], ast.Expr)}
    assert "svrg_end = N is end_epoch = N + 1" in " ".join(docs["end_epoch"].split())
    assert "`--svrg_end N` | `svrg.end_epoch=N+1`" in Path("docs/alpha-svrg.md").read_text()
    svrg = schedule_only(SVRGConfig(alpha0=0.75, end_epoch=2), 45, 20)
    svrg_end = 1
    assert [not svrg._ended(epoch) for epoch in range(3)] == [epoch <= svrg_end for epoch in range(3)]


def test_recipe_keys_and_errors():
    assert schedule_only(SVRGConfig(alpha0=0.5), 7, 10).coefficient(0) == 0.5  # one snapshot: alpha0 throughout
    assert not GRADIENT_TRANSFORMS.get("svrg").enabled(SVRGConfig())
    assert load_recipe(DEMO, ["svrg.alpha0=0.75", "mode=cached"]).svrg == SVRGConfig(alpha0=0.75, mode="cached")
    for overrides, message in [
            (["svrg.alpha0=1.5"], "svrg.alpha0=1.5 must be in [0, 1]"),
            (["svrg.alpha0=-0.1"], "svrg.alpha0=-0.1 must be in [0, 1]"),
            (["svrg.mode=cahced"], "svrg.mode='cahced' is not one of vanilla, cached; did you mean 'cached'?"),
            (["svrg.intervals=epochs"], "svrg.intervals='epochs' is not one of epoch, run; did you mean 'epoch'?"),
            (["svrg.snapshot_every=-1"], "svrg.snapshot_every=-1 must be >= 0"),
            (["svrg.end_epoch=-2"], "svrg.end_epoch=-2 must be >= 0"),
            (["svrg.alpha0=0.75", "engine=deepspeed", "model.channels_last=false"],
             "not engine.name=deepspeed: DeepSpeed averages, clips and steps the gradient inside its own step"),
    ]:
        with pytest.raises(ConfigError, match=None) as e:
            load_recipe(DEMO, overrides)
        assert message in str(e.value) and "\n" not in str(e.value), (overrides, str(e.value))
    load_recipe(DEMO, ["engine=deepspeed", "model.channels_last=false"])  # svrg off: deepspeed is fine


# ------------------------------------------------------------------ against the authors' update
def step_draws(seed: int, step: int) -> None:
    """Seed the RNG for step `step`'s random draws (dropout) as docs/alpha-svrg.md specifies:
    the key (train.seed, step, rank), rank 0 here."""
    torch.manual_seed(int(np.random.SeedSequence([seed, step, 0]).generate_state(1)[0]))


def bn_dropout_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)).double()


def regression_batch(step: int, steps_per_epoch: int):
    """The batch of step `step`: its epoch's batch `step % steps_per_epoch` (each epoch sees the same data)."""
    g = torch.Generator().manual_seed(50 + step % steps_per_epoch)
    return torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)


def authors_alpha_svrg(model: nn.Module, epochs: int, steps_per_epoch: int, alpha0: float, every: int,
                       svrg_end: int, pass_updates_running_stats: bool) -> nn.Module:
    """alpha-SVRG as the paper and its authors describe their code (written here from that
    description; nothing copied). A second model holds the snapshot. While epoch <= svrg_end,
    at every step b of the epoch with b % every == 0 the snapshot takes the weights, and the
    training model itself runs the epoch's batches at them for the full gradient F (their mean
    gradient; the forwards move the model's BatchNorm running statistics, which the project
    puts back unless told otherwise). Each step then uses g_B(theta) - alpha (g_B(theta~) - F),
    alpha from their per-epoch partition of linspace (`authors_alpha`), and SGD steps with it.
    Both forwards of a step and the pass's forward on that batch draw the same dropout masks."""
    snapshot = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    alphas = authors_alpha(alpha0, epochs, steps_per_epoch, every)

    def gradient(net, step):
        net.zero_grad()
        step_draws(0, step)
        x, y = regression_batch(step, steps_per_epoch)
        nn.functional.mse_loss(net(x), y).backward()
        return [p.grad.clone() for p in net.parameters()]

    full = None
    for epoch in range(epochs):
        on = epoch <= svrg_end
        for b in range(steps_per_epoch):
            step = epoch * steps_per_epoch + b
            if on and b % min(every, steps_per_epoch) == 0:
                with torch.no_grad():
                    for mine, theirs in zip(snapshot.parameters(), model.parameters()):
                        mine.copy_(theirs)
                saved = [b.clone() for b in model.buffers()]
                per_batch = [gradient(model, epoch * steps_per_epoch + j) for j in range(steps_per_epoch)]
                full = [sum(gs[1:], gs[0].clone()) / steps_per_epoch for gs in zip(*per_batch)]
                if not pass_updates_running_stats:
                    with torch.no_grad():
                        for buffer, value in zip(model.buffers(), saved):
                            buffer.copy_(value)
            grads = gradient(model, step)
            if on:
                at_snapshot = gradient(snapshot, step)
                grads = [g - alphas[step] * (s - f) for g, s, f in zip(grads, at_snapshot, full)]
            for p, g in zip(model.parameters(), grads):
                p.grad = g
            optimizer.step()
    return model


@pytest.mark.parametrize("every, svrg_end, mode, pass_updates_running_stats", [
    (4, 9, "vanilla", False), (4, 9, "cached", True), (4, 1, "cached", False), (0, 0, "vanilla", True),
    (6, 9, "cached", True)])
def test_equals_the_authors_update_on_a_small_problem(every, svrg_end, mode, pass_updates_running_stats):
    """BatchNorm and dropout, 3 epochs of 6 steps, float64: the transform driven as the trainer
    drives it against `authors_alpha_svrg`, weights and running statistics. Their svrg_end is
    our end_epoch - 1; a snapshot every 4 steps has its full gradient over the epoch and the
    coefficient's intervals restart each epoch; cached mode replays each step's dropout masks."""
    epochs, steps_per_epoch = 3, 6
    reference = authors_alpha_svrg(bn_dropout_model(), epochs, steps_per_epoch, 0.75, every or steps_per_epoch,
                                   svrg_end, pass_updates_running_stats)

    cfg = RunConfig()
    cfg.engine.name, cfg.optim.name, cfg.optim.lr = "ddp", "sgd", 0.05
    model = bn_dropout_model()
    engine = engine_for(model, cfg, cfg.optim.lr)

    def gradient(batch):
        x, y = batch
        engine.backward(nn.functional.mse_loss(model(x), y))
        return engine.reduced_grads()

    def batch(step):
        return regression_batch(step, steps_per_epoch)

    svrg = AlphaSVRG(SVRGConfig(alpha0=0.75, snapshot_every=every, end_epoch=svrg_end + 1, mode=mode,
                                pass_updates_running_stats=pass_updates_running_stats),
                     context(engine, gradient, batch, epochs * steps_per_epoch, steps_per_epoch))
    drive(svrg, engine, gradient, batch, epochs * steps_per_epoch, steps_per_epoch)
    ours, theirs = model.state_dict(), reference.state_dict()
    for name in theirs:
        np.testing.assert_allclose(ours[name].numpy(), theirs[name].numpy(), rtol=1e-12, atol=1e-14, err_msg=name)
    passes = int(ours["1.num_batches_tracked"]) - epochs * steps_per_epoch  # forwards that moved the statistics
    assert passes == 0 if not pass_updates_running_stats else passes > 0


# ------------------------------------------------------------------ engines, tiny model
GLOBAL_BATCH, STEPS, EVERY, STOP, STEPS_PER_EPOCH = 12, 8, 3, 5, 4
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
        self.svrg = AlphaSVRG(cfg.svrg, context(self.engine, self.gradient, self.mine, STEPS, STEPS_PER_EPOCH))

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
            epoch = step // STEPS_PER_EPOCH
            self.svrg.before_steps(step, epoch)  # idempotent within an interval: called every step here
            self.svrg.before_step(step, epoch, self.mine(step))
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


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_sharded_engines_equal_one_process_and_checkpoints_reshard(tmp_path):
    two = run_distributed(ranks_of_two, 2, str(tmp_path))[0]
    one = run_distributed(resumed_elsewhere, 1, str(tmp_path))[0]
    three = run_distributed(resumed_elsewhere, 3, str(tmp_path))[0]

    # The full gradient state of the 2-rank checkpoint, put together offline: exact.
    full = read_full(latest_checkpoint(tmp_path / "layout"))["grad_state"]
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
    fsdp2 = svrg + ["engine=fsdp2"]
    runs = [("plain", []), ("alpha0_0", ["svrg.alpha0=0", "svrg.mode=cached"]), ("vanilla", svrg),
            ("cached", svrg + ["svrg.mode=cached"]), ("stopped", svrg + ["train.stop_at=7"]), ("stopped", svrg),
            ("fsdp2", fsdp2), ("fsdp2_stopped", fsdp2 + ["svrg.mode=cached", "train.stop_at=7"]),
            ("fsdp2_stopped", fsdp2 + ["svrg.mode=cached"])]
    weights, seconds = {}, {}
    for name, overrides in runs:
        start = time.perf_counter()
        trainer = Trainer(load_recipe(DEMO, [f"out={root}/{name}", *common, *overrides], world_size=world))
        result = trainer.run()
        weights[name] = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().numpy().copy()
                         for k, v in trainer.engine.model.state_dict().items()}
        seconds[name] = time.perf_counter() - start
        assert result["status"] == ("stopped" if "train.stop_at=7" in overrides else "completed")
    return weights, seconds, trainer.steps_per_epoch


def scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


@pytest.mark.dist
@pytest.mark.timeout(600)
def test_trainer_bitwise_modes_resume_variance_and_report(tmp_path):
    """The trainer on 2 ranks, zero and fsdp2: 12 steps of the demo, a snapshot every 5 steps
    (each with a pass over the whole epoch of S steps). About 7 minutes on 2 busy CPU cores."""
    weights, seconds, S = run_distributed(trainer_runs, 2, str(tmp_path), timeout=580)[0]
    print("seconds per run:", {k: round(v, 1) for k, v in seconds.items()})

    def same(a, b):
        return (scalars(tmp_path / a, "train/loss") == scalars(tmp_path / b, "train/loss")
                and all(np.array_equal(weights[a][k], weights[b][k]) for k in weights[a]))

    assert same("alpha0_0", "plain"), "svrg.alpha0=0 must train exactly as without the section"
    assert not scalars(tmp_path / "alpha0_0", "svrg/alpha")
    assert same("cached", "vanilla"), "the pass must read the batches the steps get"
    assert same("stopped", "vanilla"), "a resume mid-interval (step 7 of [5, 10)) must be bitwise"
    assert not same("vanilla", "plain")
    assert same("fsdp2_stopped", "fsdp2"), "fsdp2: cached, stopped at 7 and resumed, must train as vanilla"
    assert not same("fsdp2", "plain") and scalars(tmp_path / "fsdp2", "svrg/alpha") == scalars(
        tmp_path / "vanilla", "svrg/alpha")

    alpha = dict(scalars(tmp_path / "vanilla", "svrg/alpha"))
    assert [alpha[s] for s in range(1, 13)] == [0.75] * 5 + [0.375] * 5 + [0.0] * 2  # 3 snapshots, linspace
    plain_var = dict(scalars(tmp_path / "vanilla", "svrg/grad_var"))
    corrected = dict(scalars(tmp_path / "vanilla", "svrg/grad_var_corrected"))
    assert sorted(plain_var) == list(range(1, 11))
    # Early in training (the first interval) the correction lowers the gradient's variance.
    assert all(corrected[s] < plain_var[s] for s in range(1, 6)), (plain_var, corrected)
    assert {s for s, _ in scalars(tmp_path / "vanilla", "svrg/grad_var_snapshot")} == {1, 6}
    # Extra forward/backward passes: a pass over the epoch's S steps per snapshot with alpha > 0
    # (steps 0 and 5), and in vanilla mode the snapshot's on each step but the first of an
    # interval (whose gradient the pass already has).
    extra = dict(scalars(tmp_path / "vanilla", "svrg/extra_steps"))
    assert S > 12 and [extra[s] for s in (1, 2, 5, 6, 10, 12)] == [S, S + 1, S + 4, 2 * S + 4, 2 * S + 8, 2 * S + 8]
    assert dict(scalars(tmp_path / "cached", "svrg/extra_steps"))[12] == 2 * S
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
    assert "| optimizer state per rank (MiB) | alpha-SVRG extra passes (steps) |" in report  # the entry's column
    rows = {line.split(" (", 1)[0]: line for line in report.splitlines() if line.startswith("| vsgd")}
    assert rows["| vsgd"].endswith("| n/a |") and rows["| vsgd + alpha-SVRG 0.75"].endswith(f"| {2 * S + 8} |")
    assert (tmp_path / "r" / "train_loss_equal_compute.png").stat().st_size > 5000

    # The stopped run's checkpoint (step 7, mid-interval) consolidated offline holds the state by name.
    step_7 = tmp_path / "stopped" / "checkpoints" / "step_00000007"
    assert launch(["checkpoint", "convert", str(step_7), "--out", str(tmp_path / "c.pt")]) == 0
    consolidated = torch.load(tmp_path / "c.pt", weights_only=True)
    assert consolidated["step"] == 7 and set(consolidated["grad_state"]) == {"svrg/full_grad", "svrg/snapshot"}
    for key in ("svrg/full_grad", "svrg/snapshot"):
        assert {k: v.shape for k, v in consolidated["grad_state"][key].items()} == {
            k: v.shape for k, v in consolidated["model"].items() if k in consolidated["optimizer"]}
