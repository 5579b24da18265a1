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
  paths agree bit for bit; on CUDA they agree to float rounding (~1e-7 relative).
  On CPU both run on pieces of at most 64K elements (bit for bit the same result), so their
  ~8 temporaries stay in cache instead of being allocated (and page-faulted) per tensor;
- fused (`fused=True`): one pass over memory that reads param, grad and state once and
  writes them once (36 bytes per fp32 element). On CPU a small C++ kernel walks the whole
  list of tensors in one call (built once per machine, ~1 s, `vsgd_cpu`); on CUDA one
  Triton launch updates the whole list (`vsgd_triton`), its scalars passed as Python floats
  (no host-to-device copy, no recompilation when lr or t change). It shares one division
  between mu and sigma2, so it agrees with the others to ~1e-7 relative per step. Where it
  cannot be built (no compiler) the unfused path runs instead, after one warning.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch.optim import Optimizer

from vsgd_dist.distributed import local_tensor
from vsgd_dist.optim.registry import OPTIMIZERS, Diagnostics, OptimizerEntry
from vsgd_dist.sharding.layout import memory_dim_order, to_memory_flat

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

    def fused_values(self, maximize: bool) -> tuple[float, ...]:
        """The fused kernels' scalars, in double precision, in their order."""
        return (self.lr, self.decay, self.inv_a, self.bg0, self.bh0, self.rho1, 1.0 - self.rho1, self.rho2,
                1.0 - self.rho2, self.eps, self.bg_first, self.bh_first, -1.0 if maximize else 1.0)


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
        for index, group in enumerate(self.param_groups):
            self._step_group(index, group)
        return loss

    def _step_group(self, index: int, group: dict) -> None:
        # Per-parameter host work is kept to attribute reads: with 161 tensors (ResNet-50) it
        # is what a fused CUDA step costs, the kernel being one launch.
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

        tables = self.__dict__.setdefault("_kernel_tables", {})  # per bucket, kept across steps
        for key, rows in buckets.items():
            scalars = _StepScalars.of(group, key[-1])
            columns = [list(column) for column in zip(*rows)]
            fused = group["fused"] and _fused_update(*columns, scalars, group["maximize"], tables, (index, *key[:-1]))
            if not fused:
                foreach = group["foreach"] or (group["foreach"] is None and key[0].type == "cuda")
                _unfused_update(*columns, scalars, group["maximize"], foreach)

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


_CHUNK = 1 << 16
"""Elements per piece of the unfused CPU path: its ~8 temporaries (2 MiB in fp32) stay in
cache and below glibc's mmap threshold instead of being mapped and page-faulted per tensor."""


def _unfused_update(params, grads, mugs, bgs, bhgs, s: _StepScalars, maximize: bool, foreach: bool) -> None:
    """Per-tensor or foreach ops; on CPU over pieces of at most `_CHUNK` elements (elementwise
    ops: the same bits as on whole tensors)."""
    pieces = [piece for tensors in zip(params, grads, mugs, bgs, bhgs) for piece in _pieces(tensors)]
    if not foreach:
        for piece in pieces:
            _single_tensor_update(*piece, s, maximize)
    elif params[0].device.type != "cpu":
        _foreach_update(params, grads, mugs, bgs, bhgs, s, maximize)
    else:
        batch, size = [], 0
        for piece in pieces:
            if batch and size + piece[0].numel() > _CHUNK:
                _foreach_update(*map(list, zip(*batch)), s, maximize)
                batch, size = [], 0
            batch.append(piece)
            size += piece[0].numel()
        _foreach_update(*map(list, zip(*batch)), s, maximize)


def _pieces(tensors: tuple) -> list[tuple]:
    """(param, grad, mug, bg, bhg) cut into 1-D pieces of at most `_CHUNK` elements on CPU; as
    they are when small, on another device, or laid out differently from each other."""
    if tensors[0].device.type != "cpu" or tensors[0].numel() <= _CHUNK:
        return [tensors]
    flat = _flat_views(tensors)
    if flat is None:
        return [tensors]
    return [tuple(f[i:i + _CHUNK] for f in flat) for i in range(0, flat[0].numel(), _CHUNK)]


def _flat_views(tensors) -> list[torch.Tensor] | None:
    """1-D views of the (local) tensors' memory in which element i is the same element of
    each, or None when shapes, strides or DTensor placements differ or memory has gaps."""
    local = [local_tensor(t) for t in tensors]
    first = local[0]
    if any(t.stride() != first.stride() or t.shape != first.shape for t in local[1:]):
        return None
    if local[0] is not tensors[0] and len({str(t.placements) for t in tensors}) > 1:  # DTensors
        return None
    if first.is_contiguous():
        return [t.view(-1) for t in local]
    try:
        order = memory_dim_order(first, "param")
    except ValueError:
        return None
    return [to_memory_flat(t, order) for t in local]


def _kernel_operands(tensors, dtype: torch.dtype | None) -> tuple[list[torch.Tensor], list[tuple]]:
    """1-D operands for a fused kernel, and the (destination, copy) pairs to write back: when
    the layouts differ, or param/grad are not of `dtype` (None: any), contiguous copies."""
    flat = _flat_views(tensors)
    if flat is not None and (dtype is None or all(t.dtype == dtype for t in flat)):
        return flat, []
    staged = [local_tensor(t).to(dtype=dtype or t.dtype, memory_format=torch.contiguous_format) for t in tensors]
    back = [(local_tensor(tensors[i]), staged[i]) for i in (0, 2, 3, 4) if staged[i] is not local_tensor(tensors[i])]
    return [t.view(-1) for t in staged], back


logger = logging.getLogger(__name__)
_fused_unavailable = ""
"""Why the fused kernel cannot run in this process (empty: it can); warned about once."""


def _fused_update(params, grads, mugs, bgs, bhgs, s: _StepScalars, maximize: bool, tables: dict,
                  key: tuple) -> bool:
    """Update the whole list with the fused kernel; False, having written nothing, when it
    cannot run here (the caller then runs the unfused path). `tables[key]` keeps this list's
    kernel table across steps (None: no fused kernel for these dtypes here)."""
    global _fused_unavailable
    if _fused_unavailable:
        return False
    try:
        if key not in tables:  # the key holds the device and dtypes that choose the kernel
            kernel = _fused_kernel(params[0].device, params[0].dtype, grads[0].dtype, mugs[0].dtype)
            tables[key] = kernel and _KeptTable(*kernel)
        if tables[key] is None:
            return False
        tables[key].update((params, grads, mugs, bgs, bhgs), s.fused_values(maximize), s.first)
        return True
    except Exception as e:  # noqa: BLE001 - any build failure: the unfused path computes the same
        _fused_unavailable = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        logger.warning("VSGD: fused kernel unavailable (%s); using the unfused path", _fused_unavailable)
        return False


def _fused_kernel(device: torch.device, param_dtype, grad_dtype, state_dtype) -> tuple | None:
    """(table type, the dtype its operands must have: None for any) of the fused kernel for
    these tensors, or None where there is none (fp64 on CUDA: the foreach path)."""
    if device.type == "cpu":
        from vsgd_dist.optim import vsgd_cpu

        return vsgd_cpu.CpuTable, state_dtype  # the C++ kernel computes in one type
    from vsgd_dist.optim import vsgd_triton  # Triton: imported where a CUDA list steps

    if not {param_dtype, grad_dtype} <= vsgd_triton.SUPPORTED or state_dtype != torch.float32:
        return None
    return vsgd_triton.TritonTable, None


class _KeptTable:
    """A fused kernel's table (pointers and sizes) of one list of tensors, kept across steps
    while the tensors' identity holds, so that such a step reads addresses and launches. A
    table type is made from (param, grad, mug, bg, bhg) tuples of one dense layout and has
    `launch(scalars, first)`; tensors that do not fit go through contiguous copies, written
    back after the launch (and then the table is rebuilt each step)."""

    def __init__(self, table_type: type, operand_dtype: torch.dtype | None):
        self.table_type, self.operand_dtype = table_type, operand_dtype
        self.table = None
        self.identity: tuple | None = None

    @staticmethod
    def identity_of(columns: tuple[list[torch.Tensor], ...]) -> tuple:
        """What must not change for a table to stay valid: every tensor's address, the sizes,
        and the gradients' strides (parameters and state keep theirs while their address
        holds). `columns`: the lists of params, grads, mugs, bgs, bhgs."""
        params, grads = columns[0], columns[1]
        return (*(t.data_ptr() for column in columns for t in column), *(p.numel() for p in params),
                *(g.stride() for g in grads))

    def update(self, columns: tuple[list[torch.Tensor], ...], scalars: tuple[float, ...], first: bool) -> None:
        if hasattr(columns[0][0], "to_local"):  # DTensors (FSDP2): their local shards
            columns = tuple([t.to_local() for t in column] for column in columns)
        identity_now, back = self.identity_of(columns), []
        if self.table is None or identity_now != self.identity:
            operands = []
            for tensors in zip(*columns):
                if not (_one_dense_layout(tensors)
                        and (self.operand_dtype is None or all(t.dtype == self.operand_dtype for t in tensors))):
                    tensors, staged = _kernel_operands(tensors, self.operand_dtype)
                    back += staged
                operands.append(tuple(tensors))
            self.table, self.identity = self.table_type(operands), None if back else identity_now
        self.table.launch(scalars, first)
        for destination, copy in back:
            destination.copy_(copy)


def _one_dense_layout(tensors) -> bool:
    """Element k of each tensor's memory is the same element of each, with no gaps (the
    common case, checked without building views)."""
    param, grad, mug, bg, bhg = tensors
    stride = param.stride()
    return (grad.stride() == stride == mug.stride() == bg.stride() == bhg.stride()
            and (param.is_contiguous() or param.is_contiguous(memory_format=torch.channels_last)))


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

OPTIMIZERS.register("vsgd", OptimizerEntry(VSGD, VSGDHparams, diagnostics=DIAGNOSTICS, fused_by_default=True))
