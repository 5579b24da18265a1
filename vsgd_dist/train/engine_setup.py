"""The `EngineSetup` of a recipe: the part of a `RunConfig` an engine is built from."""
from __future__ import annotations

from torch import nn

from vsgd_dist.config import RunConfig
from vsgd_dist.engines import Engine, EngineSetup, build_engine
from vsgd_dist.optim import OPTIMIZERS


def engine_setup(cfg: RunConfig, lr: float, hparams=None) -> EngineSetup:
    """`cfg`'s engine setup at peak LR `lr`; `hparams`: the optimizer section to use instead
    of the recipe's (e.g. with the training set size filled in)."""
    tc, o = cfg.train, cfg.optim
    return EngineSetup(engine=cfg.engine, optimizer=OPTIMIZERS.get(o.name),
                       hparams=o.hparams if hparams is None else hparams, lr=lr, weight_decay=o.weight_decay,
                       wd_exclude_1d=o.wd_exclude_1d, fused=o.fused, seed=tc.seed, grad_clip=tc.grad_clip,
                       precision=tc.precision, global_batch=tc.global_batch, accum_steps=tc.accum_steps,
                       compiled_forward=cfg.model.compile)


def engine_for(model: nn.Module, cfg: RunConfig, lr: float) -> Engine:
    """The engine `cfg` asks for, built on `model` (tests and benchmarks)."""
    return build_engine(model, engine_setup(cfg, lr))
