"""VSGD: Variational Stochastic Gradient Descent (Chen et al., arXiv 2404.06549).

The true gradient of every weight is a latent variable observed through the noisy minibatch
gradient. Per element the optimizer keeps the posterior mean of the true gradient (`mug`)
and twice the rates of two Gamma-distributed precisions (`bg`: drift of the true gradient,
`bhg`: noise of the observation). `_single_tensor_update` writes the update out per element.

Every line of the update is elementwise, so the optimizer gives identical results on a
whole tensor, a flat 1-D slice of a flattened bucket (ZeRO) or a DTensor shard (FSDP2),
as long as each piece sees the same gradient values and the same step count `t`.

Three code paths compute the same update:
- per-tensor (`foreach=False`): plain torch ops, one tensor at a time;
- multi-tensor (`foreach=True`): the same ops as `torch._foreach_*` over all tensors that
  share device, dtype and step. On CPU torch runs foreach ops tensor by tensor, so the two
  paths agree bit for bit; on CUDA they agree to float rounding (~1e-7 relative);
- fused (`fused=True`): one `torch.compile`d elementwise kernel per tensor that reads
  param, grad and state once and writes them once (36 bytes per fp32 element). Inductor
  may contract multiply-adds, so it agrees with the others to ~1e-6 relative per step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch.optim import Optimizer

from vsgd_dist.optim.registry import OPTIMIZERS, Diagnostics, OptimizerEntry

__all__ = ["VSGD", "diagnostic_fields", "diagnostic_sums", "DIAGNOSTIC_NAMES"]

_STATE_KEYS = ("mug", "bg", "bhg")


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


@dataclass(frozen=True)
class _Constants:
    """Per-group constants of the model, in double precision (spec: 'Constants')."""

    a: float  # A = 2*ps + 1 + 1e-4, twice the Gamma shape
    bg0: float  # prior rate 2*ps
    bh0: float  # prior rate 2*ghattg*ps
    # B values whose B/A equals the prior variances B0/(A-1): used at t = 1
    bg_first: float
    bh_first: float

    @staticmethod
    def of(group: dict) -> "_Constants":
        a = 2.0 * group["ps"] + 1.0 + 1e-4
        bg0 = 2.0 * group["ps"]
        bh0 = 2.0 * group["ghattg"] * group["ps"]
        return _Constants(a, bg0, bh0, bg0 * a / (a - 1.0), bh0 * a / (a - 1.0))


@dataclass(frozen=True)
class _StepScalars:
    """Everything the elementwise update needs besides tensors, for one step t."""

    lr: float
    decay: float  # 1 - lr * weight_decay
    inv_a: float
    bg0: float
    bh0: float
    rho1: float
    rho2: float
    eps: float
    first: bool
    bg_first: float
    bh_first: float

    @staticmethod
    def of(group: dict, t: int) -> "_StepScalars":
        c = _Constants.of(group)
        lr = float(group["lr"])
        return _StepScalars(lr=lr, decay=1.0 - lr * group["weight_decay"], inv_a=1.0 / c.a, bg0=c.bg0,
                            bh0=c.bh0, rho1=t ** -group["tau1"], rho2=t ** -group["tau2"],
                            eps=group["eps"], first=t == 1, bg_first=c.bg_first, bh_first=c.bh_first)


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
        fused: one compiled elementwise kernel per tensor (fastest; compiles on first step).
    """

    elementwise = True  # every state element depends only on the same gradient element

    def __init__(self, params: Iterable, lr: float = 0.1, ghattg: float = 30.0, ps: float = 1e-8,
                 tau1: float = 0.81, tau2: float = 0.9, eps: float = 1e-8, weight_decay: float = 0.0, *,
                 maximize: bool = False, state_dtype: torch.dtype | None = None,
                 foreach: bool | None = None, fused: bool | None = None):
        defaults = dict(lr=lr, ghattg=ghattg, ps=ps, tau1=tau1, tau2=tau2, eps=eps,
                        weight_decay=weight_decay, maximize=maximize, state_dtype=state_dtype,
                        foreach=foreach, fused=fused)
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
        for key in _STATE_KEYS:
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
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            for param, param_id in zip(group["params"], saved_group["params"]):
                if param_id not in saved_state:
                    continue
                saved = saved_state[param_id]
                dtype = self._state_dtype(group, param)
                state = self.state[param]
                for key in _STATE_KEYS:
                    state[key] = saved[key].to(device=param.device, dtype=dtype, copy=True)
                state["step"] = torch.as_tensor(saved["step"], dtype=torch.int64).clone()

    # ----------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        # Bucket by everything a single multi-tensor call must share.
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise RuntimeError("VSGD does not support sparse gradients; use dense gradients")
            state = self.state[param] or self._init_state(group, param)
            state["step"] += 1
            key = (param.device, param.dtype, state["mug"].dtype, int(state["step"]))
            buckets.setdefault(key, []).append(param)

        for (device, _, _, t), params in buckets.items():
            scalars = _StepScalars.of(group, t)
            grads = [p.grad for p in params]
            states = [[self.state[p][k] for p in params] for k in _STATE_KEYS]
            if group["fused"]:
                _fused_update(params, grads, *states, scalars, group["maximize"])
            elif group["foreach"] or (group["foreach"] is None and device.type == "cuda"):
                _foreach_update(params, grads, *states, scalars, group["maximize"])
            else:
                for i, p in enumerate(params):
                    _single_tensor_update(p, grads[i], states[0][i], states[1][i], states[2][i],
                                          scalars, group["maximize"])

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


# =============================================================================== kernels
def _single_tensor_update(param, grad, mug, bg, bhg, s: _StepScalars, maximize: bool) -> None:
    dtype = mug.dtype
    p = param if param.dtype == dtype else param.to(dtype)
    g = grad.to(dtype)
    if maximize:
        g = g.neg()
    if s.decay != 1.0:
        p.mul_(s.decay)
    if s.first:  # prior variances at t = 1: B/A must equal B0/(A-1)
        bg.fill_(s.bg_first)
        bhg.fill_(s.bh_first)
    vg = bg * s.inv_a
    vh = bhg * s.inv_a
    vsum = vg + vh
    mu = g * vg
    mu.add_(mug * vh)
    mu.div_(vsum)
    sigma2 = vg.mul_(vh)
    sigma2.div_(vsum)
    drift = mu - mug
    drift.mul_(drift)
    drift.add_(sigma2).add_(s.bg0)
    noise = mu - g
    noise.mul_(noise)
    noise.add_(sigma2).add_(s.bh0)
    bg.mul_(1.0 - s.rho1).add_(drift, alpha=s.rho1)
    bhg.mul_(1.0 - s.rho2).add_(noise, alpha=s.rho2)
    mug.copy_(mu)
    denom = mu.mul(mu)
    denom.add_(sigma2).sqrt_().add_(s.eps)
    p.addcdiv_(mu, denom, value=-s.lr)
    if p is not param:
        param.copy_(p)


def _foreach_update(params, grads, mugs, bgs, bhgs, s: _StepScalars, maximize: bool) -> None:
    """The same operations as `_single_tensor_update`, in the same order, as foreach ops."""
    dtype = mugs[0].dtype
    ps = params if params[0].dtype == dtype else [p.to(dtype) for p in params]
    gs = [g.to(dtype) for g in grads]
    if maximize:
        gs = torch._foreach_neg(gs)
    if s.decay != 1.0:
        torch._foreach_mul_(ps, s.decay)
    if s.first:
        for bg, bhg in zip(bgs, bhgs):
            bg.fill_(s.bg_first)
            bhg.fill_(s.bh_first)
    vg = torch._foreach_mul(bgs, s.inv_a)
    vh = torch._foreach_mul(bhgs, s.inv_a)
    vsum = torch._foreach_add(vg, vh)
    mu = torch._foreach_mul(gs, vg)
    torch._foreach_add_(mu, torch._foreach_mul(mugs, vh))
    torch._foreach_div_(mu, vsum)
    sigma2 = vg
    torch._foreach_mul_(sigma2, vh)
    torch._foreach_div_(sigma2, vsum)
    drift = torch._foreach_sub(mu, mugs)
    torch._foreach_mul_(drift, drift)
    torch._foreach_add_(drift, sigma2)
    torch._foreach_add_(drift, s.bg0)
    noise = torch._foreach_sub(mu, gs)
    torch._foreach_mul_(noise, noise)
    torch._foreach_add_(noise, sigma2)
    torch._foreach_add_(noise, s.bh0)
    torch._foreach_mul_(bgs, 1.0 - s.rho1)
    torch._foreach_add_(bgs, drift, alpha=s.rho1)
    torch._foreach_mul_(bhgs, 1.0 - s.rho2)
    torch._foreach_add_(bhgs, noise, alpha=s.rho2)
    _copy_each(mugs, mu)
    denom = torch._foreach_mul(mu, mu)
    torch._foreach_add_(denom, sigma2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, s.eps)
    torch._foreach_addcdiv_(ps, mu, denom, value=-s.lr)
    if ps is not params:
        _copy_each(params, ps)


def _copy_each(dst: list, src: list) -> None:
    # torch._foreach_copy_ has no DTensor sharding rule; plain copies work everywhere.
    for d, s in zip(dst, src):
        d.copy_(s)


def _vsgd_kernel(param, grad, mug, bg, bhg, scalars):
    """One pass over memory: reads param, grad, mug, bg, bhg; writes param, mug, bg, bhg.

    `scalars` is a small tensor (not Python floats) so a new lr or rho each step does not
    trigger a recompile. Inputs are 1-D views, compiled once with a dynamic length.
    """
    lr, decay, inv_a, bg0, bh0, rho1, rho2, eps, first, bg_first, bh_first, sign = scalars.unbind()
    dtype = mug.dtype
    p = param.to(dtype) * decay
    g = grad.to(dtype) * sign
    is_first = first > 0
    # v = B / A; A cancels in mu and appears once in sigma2, saving two multiplies.
    bg_now = torch.where(is_first, bg_first, bg)
    bh_now = torch.where(is_first, bh_first, bhg)
    inv_bsum = 1.0 / (bg_now + bh_now)  # one division shared by mu and sigma2
    mu = (g * bg_now + mug * bh_now) * inv_bsum
    sigma2 = bg_now * bh_now * inv_bsum * inv_a
    bg_new = bg * (1.0 - rho1) + rho1 * ((mu - mug) * (mu - mug) + sigma2 + bg0)
    bh_new = bhg * (1.0 - rho2) + rho2 * ((mu - g) * (mu - g) + sigma2 + bh0)
    p = p - lr * mu / (torch.sqrt(mu * mu + sigma2) + eps)
    param.copy_(p.to(param.dtype))
    mug.copy_(mu)
    bg.copy_(bg_new)
    bhg.copy_(bh_new)


_compiled_kernel = None


def _fused_update(params, grads, mugs, bgs, bhgs, s: _StepScalars, maximize: bool) -> None:
    global _compiled_kernel
    if _compiled_kernel is None:
        # dynamic_threads: the first tensor traced may be tiny; without it Inductor sizes the
        # parallel loop from that hint and emits a single-threaded kernel for every size.
        _compiled_kernel = torch.compile(_vsgd_kernel, dynamic=True, fullgraph=True,
                                         options={"cpp.dynamic_threads": True})
    values = (s.lr, s.decay, s.inv_a, s.bg0, s.bh0, s.rho1, s.rho2, s.eps, float(s.first),
              s.bg_first, s.bh_first, -1.0 if maximize else 1.0)
    scalars = torch.tensor(values, dtype=mugs[0].dtype, device=mugs[0].device)
    for tensors in zip(params, grads, mugs, bgs, bhgs):
        _compiled_kernel(*(_local(t).view(-1) for t in tensors), scalars)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself: the kernel is elementwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


# =========================================================================== diagnostics
DIAGNOSTIC_NAMES = ("count", "snr", "posterior_std", "implied_beta1", "effective_step")


@torch.no_grad()
def diagnostic_fields(mug, bg, bhg, *, lr: float, eps: float, ps: float, ghattg: float) -> dict:
    """Per-element diagnostics from the current state (for histograms).

    snr = mu^2 / sigma^2, posterior_std = sigma, implied_beta1 = B_h / (B_g + B_h) (Adam's
    beta1 that VSGD implies), effective_step = lr / (sqrt(sigma^2 + mu^2) + eps).
    Works on any tensor or slice, so a shard can compute its part.
    """
    c = _Constants.of(dict(ps=ps, ghattg=ghattg))
    dtype = torch.promote_types(mug.dtype, torch.float32)
    mu, bg, bhg = mug.to(dtype), bg.to(dtype), bhg.to(dtype)
    vg, vh = bg / c.a, bhg / c.a
    sigma2 = vg * vh / (vg + vh)
    return {
        "snr": mu * mu / sigma2,
        "posterior_std": sigma2.sqrt(),
        "implied_beta1": bhg / (bg + bhg),
        "effective_step": lr / ((sigma2 + mu * mu).sqrt() + eps),
    }


@torch.no_grad()
def diagnostic_sums(mug, bg, bhg, *, lr: float, eps: float, ps: float, ghattg: float) -> torch.Tensor:
    """[count, sum snr, sum posterior_std, sum implied_beta1, sum effective_step] as one
    fp64 tensor on the state's device: sums add across shards (all_reduce SUM), so a
    sharded run reports the same means as an unsharded one."""
    fields = diagnostic_fields(mug, bg, bhg, lr=lr, eps=eps, ps=ps, ghattg=ghattg)
    sums = [f.sum(dtype=torch.float64) for f in fields.values()]
    count = torch.tensor(float(mug.numel()), dtype=torch.float64, device=mug.device)
    return torch.stack([count, *sums])


def diagnostic_means(sums: torch.Tensor) -> dict[str, float]:
    """Turn (reduced) sums into means; the one host copy happens here."""
    values = sums.double().cpu().tolist()
    count = values[0]
    return {name: (v / count if count else float("nan")) for name, v in zip(DIAGNOSTIC_NAMES[1:], values[1:])}


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


def _diagnostic_fields(mug, bg, bhg, hp: dict) -> dict:
    return diagnostic_fields(mug, bg, bhg, lr=hp["lr"], eps=hp["eps"], ps=hp["ps"], ghattg=hp["ghattg"])


DIAGNOSTICS = Diagnostics(_STATE_KEYS, _diagnostic_fields, {
    "snr": ("log10", -8.0, 4.0),
    "posterior_std": ("log10", -12.0, 2.0),
    "implied_beta1": ("linear", 0.0, 1.0),
    "effective_step": ("log10", -8.0, 2.0),
})
"""Gradient SNR, posterior std, implied Adam beta1 and effective step size, per layer."""

OPTIMIZERS.register("vsgd", OptimizerEntry(VSGD, VSGDHparams, diagnostics=DIAGNOSTICS))
