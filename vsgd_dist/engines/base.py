"""The engine interface: how a distribution strategy runs the step protocol, and nothing else.

An engine wraps the model and owns the (possibly sharded) optimizer. The loop calls, per step,

    for x in micro_batches[:-1]:          # train.accum_steps micro-batches
        with engine.no_sync():
            engine.backward(loss_fn(engine.wrapped(x)) / accum_steps)
    engine.backward(loss_fn(engine.wrapped(micro_batches[-1])) / accum_steps)
    edit(engine.reduced_grads())          # gradient transforms, if any
    norm = engine.step()                  # clip (train.grad_clip), step, zero the gradients

and never branches on which engine or optimizer it has. An optimizer that trains at weight
samples is driven around this by `vsgd_dist.engines.sampling.WeightSampling`, through the
engine's `sampler`. What checkpoints, diagnostics and gradient transforms need to know about
where this rank's pieces live is `ownership()` (`vsgd_dist.engines.ownership`).
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import ContextManager

import torch
import torch.distributed as dist
from torch import nn

from vsgd_dist.distributed import local_tensor
from vsgd_dist.engines.ownership import Ownership
from vsgd_dist.engines.setup import EngineSetup
from vsgd_dist.optim import named_param_groups
from vsgd_dist.optim.registry import Sampler


class Engine(ABC):
    model: nn.Module
    """The model itself: its parameters, buffers and state_dict (for checkpoints, EMA, eval mode)."""
    wrapped: nn.Module
    """Call this for the forward pass (DDP, FSDP2 or DeepSpeed wrapper, or the model)."""
    optimizer: torch.optim.Optimizer
    """Its `param_groups` are what the LR scheduler drives."""
    sampler: Sampler | None = None
    """How to draw weight samples of `optimizer` (the registry entry's `Sampler`, or the
    sharded form of it), or None for an optimizer that trains at the mean."""

    def __init__(self, model: nn.Module, setup: EngineSetup):
        self._setup = setup
        self.model = model
        self.sampler = setup.optimizer.sampler
        self._param_groups = named_param_groups(model, setup.weight_decay, setup.wd_exclude_1d)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self) -> ContextManager:
        """Around the backward of every accumulation micro-batch but the last: gradients add
        up locally in `.grad`, and the last backward (outside) synchronizes their sum. Here:
        nothing to skip (one process); engines with a wrapper use its own."""
        return contextlib.nullcontext()

    def reduced_grads(self) -> list[torch.Tensor]:
        """This rank's averaged gradient after the backward that synchronizes (the last
        micro-batch's), laid out like `ownership().stores`: one tensor per parameter here (its
        local shard with FSDP2), in param-group order; edit in place to change what clipping
        and the optimizer see. Valid until `zero_grad()`. A parameter without a gradient gets
        zeros."""
        grads = []
        for p in self._params():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(local_tensor(p.grad))
        return grads

    @abstractmethod
    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global norm of the averaged gradient (all ranks agree); clips to max_norm."""

    def step(self) -> torch.Tensor:
        """Clip (when train.grad_clip > 0), step, zero the gradients; return the global
        gradient norm before clipping."""
        clip = self._setup.grad_clip
        norm = self.clip_grad_norm(clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.zero_grad()
        return norm

    def zero_grad(self) -> None:
        """Drop the gradients (and, on sharded engines, the reduction's bookkeeping)."""
        self.optimizer.zero_grad(set_to_none=True)

    def wait_for_parameters(self) -> None:
        """Complete any all-gather of the parameters a step left running (ZeRO's
        engine.prefetch_params), so that whoever reads them sees the new weights."""

    @abstractmethod
    def ownership(self) -> Ownership:
        """Which elements of each parameter this rank holds, and where they and their
        optimizer state live."""

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self._param_groups for p in g["params"]]

    def _named_params(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, p) for g in self._param_groups for n, p in zip(g["param_names"], g["params"])]

    def _names_per_group(self) -> list[list[str]]:
        return [list(g["param_names"]) for g in self._param_groups]


def sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running stats) before evaluation and
    checkpoints, as DDP does by default. Rank 0's buffers never change by this, so a run
    that is checkpointed at extra steps (a preemption) keeps the same model as one that is
    not, and what rank 0 saves is what every rank evaluates."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    buffers = list(model.buffers())
    if buffers:
        flat = torch.cat([b.detach().reshape(-1).double() for b in buffers])
        dist.broadcast(flat, src=0)
        offset = 0
        for b in buffers:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()
