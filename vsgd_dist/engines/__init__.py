"""Distribution strategies behind one interface (`Engine`), chosen by `engine.name`."""
from __future__ import annotations

from torch import nn

from vsgd_dist.engines.base import Engine, sync_buffers
from vsgd_dist.engines.registry import ENGINES, engine_class
from vsgd_dist.engines.setup import EngineSetup


def build_engine(model: nn.Module, setup: EngineSetup) -> Engine:
    return engine_class(setup.engine.name)(model, setup)


__all__ = ["ENGINES", "Engine", "EngineSetup", "build_engine", "engine_class", "sync_buffers"]
