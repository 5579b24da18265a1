"""VSGD: Variational Stochastic Gradient Descent (Chen et al., arXiv 2404.06549).

The true gradient of every weight is a latent variable observed through the noisy minibatch
gradient. Per element the optimizer keeps the posterior mean of the true gradient (`mug`)
and twice the rates of two Gamma-distributed precisions (`bg`: drift of the true gradient,
`bhg`: noise of the observation). `vsgd_update.single_tensor_update` writes the update out
per element.

Every line of the update is elementwise, so the optimizer gives identical results on a
whole tensor, a flat 1-D slice of a flattened bucket (ZeRO) or a DTensor shard (FSDP2),
as long as each piece sees the same gradient values and the same step count `t`.

This module holds the optimizer (arguments, state, which path steps which tensors) and its
registration; the update in torch ops (per-tensor and foreach) is `vsgd_update`, the fused
kernel path (C++ on CPU, Triton on CUDA, with its kept tables) `vsgd_fused`, the diagnostics
`vsgd_diagnostics`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch.optim import Optimizer

from vsgd_dist.optim.registry import OPTIMIZERS, OptimizerEntry
from vsgd_dist.optim.vsgd_diagnostics import DIAGNOSTICS, STATE_KEYS, diagnostic_sums
from vsgd_dist.optim.vsgd_fused import FusedVSGD
from vsgd_dist.optim.vsgd_update import StepScalars, unfused_update

__all__ = ["VSGD", "VSGDHparams"]


def _check_range(name: str, value: Any, low: float, high: float, low_open: bool, high_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo = ("(" if low_open else "[") + f"{low:g}"
        hi = ("inf)" if high == math.inf else f"{high:g}" + (")" if high_open else "]"))
        raise ValueError(f"VSGD: invalid {name}={value!r}; allowed range is {lo}, {hi}")


def _validate_group(group: dict) -> None:
    _check_range("lr", group["lr"], 0.0, math.inf, False, True)
    _check_range("ghattg", group["ghattg"], 0.0, math.inf, True, True)
    _check_range("ps", group["ps"], 0.0, math.inf, True, True)
    _check_range("tau1", group["tau1"], 0.0, 1.0, True, False)
    _check_range("tau2", group["tau2"], 0.0, 1.0, True, False)
    _check_range("eps", group["eps"], 0.0, math.inf, True, True)
    _check_range("weight_decay", group["weight_decay"], 0.0, math.inf, False, True)
    if group["state_dtype"] not in (None, torch.float32, torch.float64):
        raise ValueError(f"VSGD: invalid state_dtype={group['state_dtype']!r}; "
                         "use None (match the parameter, fp32 for bf16/fp16), torch.float32 or torch.float64")
    if group["foreach"] and group["fused"]:
        raise ValueError("VSGD: foreach=True and fused=True are exclusive; pick one")


class VSGD(Optimizer):
    """Variational SGD with the hyperparameter names of the authors' code.

    Args:
        params: parameters or param groups (every hyperparameter can be overridden per group).
        lr: learning rate (eta).
        ghattg: prior variance ratio K_g = Var(g_hat - g) / Var(g_t - g_{t-1}).
        ps: prior strength gamma.
        tau1, tau2: decay exponents of the SVI step sizes rho = t^-tau, in (0, 1].
        eps: added to the denominator.
        weight_decay: decoupled (AdamW-style) weight decay, applied before the update.
        maximize: ascend instead of descend.
        state_dtype: dtype of mug/bg/bhg; None keeps fp32/fp64 params' dtype and uses fp32
            for bf16/fp16 params. The update is computed in the state dtype.
        foreach: multi-tensor path; None picks it when the parameters are on CUDA.
        fused: one elementwise pass over memory (fastest; builds its kernel on the first step
            and falls back to the unfused path, with one warning, where it cannot).
    """

    elementwise = True  # every state element depends only on the same gradient element

    def __init__(self, params: Iterable, lr: float = 0.1, ghattg: float = 30.0, ps: float = 1e-8,
                 tau1: float = 0.81, tau2: float = 0.9, eps: float = 1e-8, weight_decay: float = 0.0, *,
                 maximize: bool = False, state_dtype: torch.dtype | None = None,
                 foreach: bool | None = None, fused: bool | None = None):
        defaults = dict(lr=lr, ghattg=ghattg, ps=ps, tau1=tau1, tau2=tau2, eps=eps,
                        weight_decay=weight_decay, maximize=maximize, state_dtype=state_dtype,
                        foreach=foreach, fused=fused)
        self.fused_path = FusedVSGD()  # kernel, kept tables and plans of fused=True groups
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _validate_group(self.param_groups[-1])

    # ---------------------------------------------------------------------------- state
    @staticmethod
    def _state_dtype(group: dict, param: torch.Tensor) -> torch.dtype:
        if group["state_dtype"] is not None:
            return group["state_dtype"]
        return param.dtype if param.dtype in (torch.float32, torch.float64) else torch.float32

    def _init_state(self, group: dict, param: torch.Tensor) -> dict:
        dtype = self._state_dtype(group, param)
        state = self.state[param]
        for key in STATE_KEYS:
            state[key] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        state["step"] = torch.tensor(0, dtype=torch.int64)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load without torch's cast of every state tensor to the parameter's dtype.

        torch casts optimizer state to the parameter dtype on load; for bf16 parameters with
        fp32 state that would round the variational state. Here state keeps its own dtype.
        """
        saved_state = state_dict["state"]
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        self.fused_path.forget_tables()
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            for param, param_id in zip(group["params"], saved_group["params"]):
                if param_id not in saved_state:
                    continue
                saved = saved_state[param_id]
                dtype = self._state_dtype(group, param)
                state = self.state[param]
                for key in STATE_KEYS:
                    state[key] = saved[key].to(device=param.device, dtype=dtype, copy=True)
                state["step"] = torch.as_tensor(saved["step"], dtype=torch.int64).clone()

    # ----------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            self._step_group(index, group)
        return loss

    def _step_group(self, index: int, group: dict) -> None:
        if group["fused"] and self.fused_path.step_planned(index, group, self.state):
            return
        self.fused_path.plans.pop(index, None)  # the steps below change what a plan kept
        with_grad, states = [], []
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError("VSGD does not support sparse gradients; use dense gradients")
            with_grad.append(param)
            states.append(self.state[param] or self._init_state(group, param))
        if not with_grad:
            return
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, 1)  # host tensors: one call for all
        # Bucket by everything a single multi-tensor call must share.
        buckets: dict[tuple, list[tuple]] = {}
        for param, state, t in zip(with_grad, states, torch.stack(steps).tolist()):
            grad, mug = param.grad, state["mug"]
            key = (param.device, param.dtype, grad.dtype, mug.dtype, t)
            buckets.setdefault(key, []).append((param, grad, mug, state["bg"], state["bhg"]))
        for key, rows in buckets.items():
            scalars = StepScalars.of(group, key[-1])
            columns = tuple(list(column) for column in zip(*rows))
            if group["fused"] and self.fused_path.step((index, *key[:-1]), columns, scalars, group["maximize"]):
                continue
            foreach = group["foreach"] or (group["foreach"] is None and key[0].type == "cuda")
            unfused_update(*columns, scalars, group["maximize"], foreach)
        if group["fused"] and len(buckets) == 1 and len(with_grad) == len(group["params"]):
            self.fused_path.keep_plan(index, (index, *key[:-1]), with_grad, states, key[-1])

    # ---------------------------------------------------------------------- diagnostics
    @torch.no_grad()
    def diagnostic_sums(self, param: torch.Tensor) -> torch.Tensor | None:
        """Sums over the elements of `param`'s state (see `diagnostic_sums`), or None before
        its first step. Stays on the state's device: no host copy until the caller logs."""
        state = self.state.get(param)
        if not state or int(state["step"]) == 0:
            return None
        group = next(g for g in self.param_groups if any(p is param for p in g["params"]))
        return diagnostic_sums(state["mug"], state["bg"], state["bhg"], lr=group["lr"],
                               eps=group["eps"], ps=group["ps"], ghattg=group["ghattg"])


@dataclass
class VSGDHparams:
    ghattg: float = 30.0
    """Prior variance ratio K_g = Var(g_hat - g) / Var(g_t - g_{t-1})."""
    ps: float = 1e-8
    """Prior strength gamma."""
    tau1: float = 0.81
    """Decay exponent of the SVI step on the true-gradient side, in (0, 1]."""
    tau2: float = 0.9
    """Decay exponent of the SVI step on the observation side, in (0, 1]."""
    eps: float = 1e-8
    """Added to the denominator."""


OPTIMIZERS.register("vsgd", OptimizerEntry(VSGD, VSGDHparams, diagnostics=DIAGNOSTICS, fused_by_default=True))
