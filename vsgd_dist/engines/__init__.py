"""Distribution strategies behind one interface (`Engine`), chosen by `engine.name`."""
from __future__ import annotations

from vsgd_dist.engines.base import Engine


def build_engine(model, cfg, lr: float) -> Engine:
    """ddp | zero | fsdp2 | deepspeed, imported lazily (DeepSpeed is slow to import)."""
    name = cfg.engine.name
    if name == "ddp":
        from vsgd_dist.engines.ddp import DDPEngine as cls
    elif name == "zero":
        from vsgd_dist.engines.zero import ZeroEngine as cls
    elif name == "fsdp2":
        from vsgd_dist.engines.fsdp2 import FSDP2Engine as cls
    elif name == "deepspeed":
        from vsgd_dist.engines.deepspeed import DeepSpeedEngine as cls
    else:
        raise ValueError(f"unknown engine {name!r}; choose ddp, zero, fsdp2 or deepspeed")
    return cls(model, cfg, lr)


__all__ = ["Engine", "build_engine"]
