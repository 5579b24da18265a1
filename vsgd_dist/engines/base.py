"""The engine interface: everything the training loop needs from a distribution strategy.

An engine owns the wrapped model and the (possibly sharded) optimizer. The loop calls, per step,

    for k in range(engine.mc_samples):
        engine.sample(k)                  # no-op unless the optimizer trains at weight samples
        for x in micro_batches[:-1]:      # train.accum_steps micro-batches
            with engine.no_sync():
                engine.backward(loss_fn(engine.wrapped(x)) / accum_steps)
        engine.backward(loss_fn(engine.wrapped(micro_batches[-1])) / accum_steps)
        if k + 1 < engine.mc_samples:
            engine.accumulate()
    engine.step()

and never branches on which engine or optimizer it has. `restore()` makes the model hold the
mean weights again (before evaluating or averaging them).

Gradient transforms (alpha-SVRG, `vsgd_dist.transforms`) see the gradient where it is averaged:
`step()` and `accumulate()` hand `reduced_grads()` (this rank's part after the all-reduce or
reduce-scatter) to each of `grad_transforms` before clipping. `local_weights()` and
`weights_swapped()` let them compute gradients at other weights, and `grad_state_payload` /
`grad_state_full` / `grad_state_from_full` move their per-element state (laid out like the
gradient) through checkpoints at any world size, as the optimizer state moves.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Callable, ContextManager, Iterator

import torch
import torch.distributed as dist
from torch import nn

from vsgd_dist.engines.registry import engine_class
from vsgd_dist.full_form import FORMAT, CheckpointMismatch, check_optimizer
from vsgd_dist.optim import OPTIMIZERS, named_param_groups
from vsgd_dist.sharding.zero import class_path


class Engine(ABC):
    name: str = ""
    model: nn.Module
    """The model itself: its parameters, buffers and state_dict (for checkpoints, EMA, eval mode)."""
    wrapped: nn.Module
    """Call this for the forward pass (DDP, FSDP2 or DeepSpeed wrapper, or the model)."""
    optimizer: torch.optim.Optimizer
    """Its `param_groups` are what the LR scheduler drives."""
    sharded_state: bool = True
    """Whether each rank holds only part of the optimizer state (diagnostics then reduce)."""
    samples: bool = False
    """Whether the optimizer trains at weight samples (`OptimizerEntry.sampling`)."""
    sharded_grads: bool = True
    """Whether `reduced_grads()` is only this rank's part of the gradient (sums over its
    elements then add up over `shard_group`) rather than all of it."""
    shard_group: dist.ProcessGroup | None = None
    """The ranks whose parts of the sharded state and gradient make up the whole, so that sums
    over them are the unsharded sums: None for the world; this node's ranks with
    engine.shard_within=node (each node holds a whole copy)."""

    def __init__(self, model: nn.Module, cfg, lr: float):
        self.cfg = cfg
        self.model = model
        self.max_norm = cfg.train.grad_clip
        entry = OPTIMIZERS.get(cfg.optim.name)
        self.optimizer_class = entry.optimizer_class
        self.samples = entry.sampling
        self.optimizer_kwargs = entry.kwargs(cfg.optim.hparams, lr, cfg.optim.weight_decay,
                                             cfg.optim.fused, seed=cfg.train.seed)
        self.param_groups = named_param_groups(model, cfg.optim.weight_decay, cfg.optim.wd_exclude_1d)
        self.grad_transforms: list[Callable[[list[torch.Tensor]], None]] = []
        """Edit `reduced_grads()` in place after the gradients are averaged, before clipping and
        the step (or a weight sample's accumulation), in this order."""

    @property
    def mc_samples(self) -> int:
        """Forward/backward passes per step: the optimizer's weight samples, else 1."""
        return self.optimizer.param_groups[0]["mc_samples"] if self.samples else 1

    def sample(self, mc_sample: int, evaluation: bool = False) -> None:
        """Before the forward of weight sample `mc_sample`: the model holds m_w + eps. With
        `evaluation`, a posterior-predictive sample (its own noise; `restore()` after)."""
        if self.samples:
            self.optimizer.sample(mc_sample, evaluation=evaluation)

    def accumulate(self) -> None:
        """After the backward of every weight sample but the last: its gradient, clipped like
        a step's (train.grad_clip), goes into the step's sums."""
        if self.samples:
            self._transform_grads()
            if self.max_norm > 0:
                self.clip_grad_norm(self.max_norm)
            self.optimizer.accumulate()

    def restore(self) -> None:
        """Make the model hold the mean weights: after evaluation samples, and before anything
        reads the weights after a step (ZeRO defers that all-gather to the next sample)."""
        if self.samples:
            self.optimizer.restore()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self) -> ContextManager:
        """Around the backward of every accumulation micro-batch but the last: gradients add
        up locally in `.grad`, and the last backward (outside) synchronizes their sum. Here:
        the wrapper's own `no_sync` (DDP), or nothing to skip (one process)."""
        no_sync = getattr(self.wrapped, "no_sync", None)
        return no_sync() if no_sync is not None else contextlib.nullcontext()

    def step(self) -> torch.Tensor:
        """Transform (`grad_transforms`), clip (when train.grad_clip > 0), step, zero the
        gradients; return the global gradient norm before clipping."""
        self._transform_grads()
        norm = self.clip_grad_norm(self.max_norm if self.max_norm > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def zero_grad(self) -> None:
        """Drop the gradients (and, on sharded engines, the reduction's bookkeeping)."""
        self.optimizer.zero_grad(set_to_none=True)

    # ---- gradient transforms ---------------------------------------------------------------
    def _transform_grads(self) -> None:
        if self.grad_transforms:
            grads = self.reduced_grads()
            for transform in self.grad_transforms:
                transform(grads)

    def _named_params(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, p) for g in self.param_groups for n, p in zip(g["param_names"], g["params"])]

    def reduced_grads(self) -> list[torch.Tensor]:
        """This rank's averaged gradient after the backward that synchronizes (the last
        micro-batch's): one tensor per parameter here (its local shard with FSDP2), in
        param-group order; edit in place to change what clipping and the optimizer see. Valid
        until `zero_grad()`. A parameter without a gradient gets zeros."""
        grads = []
        for _, p in self._named_params():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(local_tensor(p.grad))
        return grads

    def local_weights(self) -> list[torch.Tensor]:
        """The weights this rank updates, laid out like `reduced_grads()` (views: clone what
        you keep)."""
        return [local_tensor(p.detach()) for _, p in self._named_params()]

    @torch.no_grad()
    def set_local_weights(self, weights: list[torch.Tensor]) -> None:
        """Copy `local_weights()`-shaped tensors in; the model then computes with them on every
        rank (each rank passes its own part)."""
        for mine, value in zip(self.local_weights(), weights):
            mine.copy_(value)

    @contextlib.contextmanager
    def weights_swapped(self, weights: list[torch.Tensor]):
        """The model computes with `weights` inside, with its own weights again after (restored
        bit for bit; costs a copy of this rank's weights while inside)."""
        current = [w.clone() for w in self.local_weights()]
        self.set_local_weights(weights)
        try:
            yield
        finally:
            self.set_local_weights(current)

    def grad_state_payload(self, state: dict[str, list[torch.Tensor]]) -> dict:
        """What this rank writes into its checkpoint file of per-element tensors laid out like
        `reduced_grads()` ({key: tensors}). Here (replicated): rank 0 writes them by name."""
        if dist.is_initialized() and dist.get_rank() > 0:
            return {}
        names = [n for n, _ in self._named_params()]
        return {key: dict(zip(names, tensors)) for key, tensors in state.items()}

    @classmethod
    def grad_state_full(cls, read: Callable[[int], dict], meta: dict) -> dict[str, dict[str, torch.Tensor]]:
        """{key: {param name: full tensor}} from every rank's `grad_state_payload` (`read(rank)`
        gives that rank's engine payload); needs no process group."""
        return {key: dict(by_name) for key, by_name in read(0)["grad_state"].items()}

    def grad_state_from_full(self, full: dict[str, dict[str, torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
        """This rank's part of `grad_state_full`'s tensors, laid out like `reduced_grads()`."""
        named = self._named_params()
        return {key: [self._place(name, p, by_name[name]) for name, p in named] for key, by_name in full.items()}

    def _place(self, name: str, param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full per-parameter tensor, laid out like its local weight."""
        return torch.empty_like(local_tensor(param.detach())).copy_(full)

    def load_grad_state(self, read: Callable[[int], dict], meta: dict) -> dict[str, list[torch.Tensor]]:
        """The per-element gradient-layout state of a checkpoint written by any engine at any
        world size, as this rank lays it out."""
        return self.grad_state_from_full(engine_class(meta["engine"]).grad_state_full(read, meta))

    @abstractmethod
    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Global norm of the averaged gradient (all ranks agree); clips to max_norm."""

    @abstractmethod
    def state_bytes(self) -> int:
        """Optimizer-state bytes held by this rank."""

    @abstractmethod
    def state_pieces(self, keys: tuple[str, ...]) -> Iterator[tuple]:
        """(parameter name, *state tensors `keys`, hyperparameters) for the optimizer state
        this rank holds: whole tensors, flat slices or local shards; empty before the first
        step (the input of `vsgd_dist.optim.diagnostics.reduced_diagnostics`)."""

    @abstractmethod
    def checkpoint_state(self) -> dict:
        """What this rank writes into its checkpoint file (tensors and plain values)."""

    @abstractmethod
    def load_full_state(self, full: dict) -> None:
        """Load the full per-parameter form (`vsgd_dist.full_form`), keeping this rank's
        part: how any checkpoint loads at any world size."""

    @classmethod
    def full_state(cls, read: Callable[[int], dict], meta: dict) -> dict:
        """The full form of a checkpoint this engine wrote; `read(rank)` gives that rank's
        engine payload, `meta` its meta.json. Needs no process group."""
        return {"format": FORMAT, "step": meta["step"], "optimizer_class": meta["optimizer_class"],
                "master": {}, **cls._full_state_parts(read, meta)}

    @classmethod
    @abstractmethod
    def _full_state_parts(cls, read: Callable[[int], dict], meta: dict) -> dict:
        """"model", "optimizer", "param_groups" (and "master" where it differs from the
        weights) of the full form, from every rank's file."""

    def load_checkpoint_state(self, read: Callable[[int], dict], meta: dict) -> None:
        """Load from a checkpoint; `read(rank)` gives that rank's engine payload, `meta` its
        meta.json. A checkpoint of this engine and layout loads shard by shard; any other
        (another world size or engine) is consolidated by every rank, which then keeps its
        part (mmap'd reads: only the pages touched are read)."""
        check_optimizer(meta, class_path(self.optimizer_class))
        if not self._load_own_shard(read, meta):
            self.load_full_state(engine_class(meta["engine"]).full_state(read, meta))

    def _load_own_shard(self, read: Callable[[int], dict], meta: dict) -> bool:
        """Load this rank's shard when the checkpoint has this run's exact layout; return
        whether it did. Engines without a cheaper path than the full form return False."""
        return False

    def _load_model(self, state: dict) -> None:
        """Load model weights, naming what differs instead of torch's long error."""
        self._check_model(state)
        self.model.load_state_dict(state)

    def _check_model(self, state: dict) -> None:
        mine = self.model.state_dict()
        missing = sorted(set(mine) - set(state))
        unexpected = sorted(set(state) - set(mine))
        if missing or unexpected:
            raise CheckpointMismatch(f"checkpoint is of another model: missing {missing[:3]}, unexpected "
                                     f"{unexpected[:3]}; use another out= folder")
        for name, value in state.items():
            if tuple(value.shape) != tuple(mine[name].shape):
                raise CheckpointMismatch(f"checkpoint is of another model: {name} has shape {tuple(value.shape)} "
                                         f"there, {tuple(mine[name].shape)} here; use another out= folder")

    def _names_per_group(self) -> list[list[str]]:
        return [list(g["param_names"]) for g in self.param_groups]

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm running stats) before evaluation and
        checkpoints, as DDP does by default. Rank 0's buffers never change by this, so a run
        that is checkpointed at extra steps (a preemption) keeps the same model as one
        that is not, and what rank 0 saves is what every rank evaluates."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        buffers = list(self.model.buffers())
        if buffers:
            flat = torch.cat([b.detach().reshape(-1).double() for b in buffers])
            dist.broadcast(flat, src=0)
            offset = 0
            for b in buffers:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()

    def _state_pieces_of(self, optimizer: torch.optim.Optimizer, keys: tuple[str, ...]) -> Iterator:
        """Pieces of an optimizer built directly on the named `param_groups` (DDP, FSDP2)."""
        for group in optimizer.param_groups:
            for name, param in zip(group["param_names"], group["params"]):
                state = optimizer.state.get(param)
                if state and keys[0] in state and int(state["step"]) > 0:
                    yield name, *(local_tensor(state[k]) for k in keys), group


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (FSDP2), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
