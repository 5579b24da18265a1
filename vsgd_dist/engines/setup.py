"""What an engine is built from: `EngineSetup`, a typed slice of the run's recipe.

An engine sees the recipe's `engine` section, the optimizer's registry entry with its
constructor arguments, and the few training settings that decide how it reduces and steps;
never the whole `RunConfig` (`vsgd_dist.train.engine_setup.engine_setup` cuts this out of it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vsgd_dist.optim.registry import OptimizerEntry


@dataclass(frozen=True)
class EngineSetup:
    engine: Any
    """The recipe's `engine` section (`vsgd_dist.config.EngineConfig`): name, zero_stage,
    bucket_mb, shard_within, prefetch_params."""
    optimizer: OptimizerEntry
    """The optimizer's registry entry: its class and the capabilities it declares (a
    `Sampler` for optimizers that train at weight samples, its DeepSpeed optimizer section)."""
    hparams: Any
    """The recipe's `optim.<name>` section, with a "training set size" field filled in."""
    lr: float
    """The peak learning rate (the LR scheduler scales it per step)."""
    weight_decay: float
    """optim.weight_decay, for the group of decayed weights."""
    wd_exclude_1d: bool = True
    """optim.wd_exclude_1d: norms and biases get a second group without weight decay."""
    fused: bool | None = None
    """optim.fused (None: the optimizer's default)."""
    seed: int = 0
    """train.seed: the noise of a sampling optimizer follows it."""
    grad_clip: float = 0.0
    """train.grad_clip: `step()` clips the global gradient norm to it (0: off)."""
    precision: str = "fp32"
    """train.precision: fp32 or bf16 (FSDP2 all-gathers and DeepSpeed keeps weights in it)."""
    global_batch: int = 256
    """train.global_batch: DeepSpeed's train_batch_size."""
    accum_steps: int = 1
    """train.accum_steps: DeepSpeed's gradient_accumulation_steps."""
    compiled_forward: bool = False
    """Whether the trainer compiles the wrapped model (model.compile): forward pre-hooks
    would run inside a compiled graph, so ZeRO's parameter prefetch stays off."""

    def optimizer_kwargs(self) -> dict:
        """The optimizer's constructor arguments besides its parameters."""
        return self.optimizer.kwargs(self.hparams, self.lr, self.weight_decay, self.fused, seed=self.seed)
