"""Distribution strategies behind one interface (`Engine`), chosen by `engine.name`."""
from __future__ import annotations

from typing import Callable

from vsgd_dist.engines.base import Engine
from vsgd_dist.engines.registry import ENGINES, engine_class


def build_engine(model, cfg, lr: float) -> Engine:
    return engine_class(cfg.engine.name)(model, cfg, lr)


def full_state(read: Callable[[int], dict], meta: dict) -> dict:
    """The world-size-free full form (`vsgd_dist.full_form`) of the checkpoint that `meta`
    (its meta.json) describes, assembled by the engine that wrote it. Needs no process group."""
    return engine_class(meta["engine"]).full_state(read, meta)


__all__ = ["ENGINES", "Engine", "build_engine", "engine_class", "full_state"]
