"""The engine registry: what a recipe's `engine.name` can select.

Engines register by import path and load on first use: DeepSpeed takes seconds to import,
and a run pays for the engine it uses only.
"""
from __future__ import annotations

import importlib

from vsgd_dist.registry import Registry

ENGINES: Registry[str] = Registry("engine")
ENGINES.register("ddp", "vsgd_dist.engines.ddp:DDPEngine")
ENGINES.register("zero", "vsgd_dist.engines.zero:ZeroEngine")
ENGINES.register("fsdp2", "vsgd_dist.engines.fsdp2:FSDP2Engine")
ENGINES.register("deepspeed", "vsgd_dist.engines.deepspeed:DeepSpeedEngine")
SHARD_WITHIN = ("world", "node")
"""Values of engine.shard_within."""
SHARD_WITHIN_NODE = ("zero", "fsdp2")
"""Engines that can shard within each node (engine.shard_within=node)."""


def engine_class(name: str) -> type:
    """The `Engine` subclass registered as `name`, imported now."""
    module, _, cls = ENGINES.get(name).partition(":")
    return getattr(importlib.import_module(module), cls)
