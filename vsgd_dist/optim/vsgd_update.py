"""VSGD's update rule in torch ops: the reference the fused kernels (`vsgd_fused`) are tested
against, and the unfused paths the optimizer runs where no fused kernel takes the tensors.

Two paths compute the same update:
- per-tensor (`foreach=False`): plain torch ops, one tensor at a time;
- multi-tensor (`foreach=True`): the same ops as `torch._foreach_*` over all tensors that
  share device, dtype and step. On CPU torch runs foreach ops tensor by tensor, so the two
  paths agree bit for bit; on CUDA they agree to float rounding (~1e-7 relative).
On CPU both run on pieces of at most `CHUNK` elements (bit for bit the same result), so their
~8 temporaries stay in cache instead of being allocated (and page-faulted) per tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vsgd_dist.distributed import local_tensor
from vsgd_dist.sharding.layout import memory_dim_order, to_memory_flat

__all__ = ["CHUNK", "Constants", "StepScalars", "flat_views", "foreach_update", "pieces", "single_tensor_update",
           "unfused_update"]


@dataclass(frozen=True)
class Constants:
    """Per-group constants of the model, in double precision (spec: 'Constants')."""

    a: float  # A = 2*ps + 1 + 1e-4, twice the Gamma shape
    bg0: float  # prior rate 2*ps
    bh0: float  # prior rate 2*ghattg*ps
    # B values whose B/A equals the prior variances B0/(A-1): used at t = 1
    bg_first: float
    bh_first: float

    @staticmethod
    def of(group: dict) -> "Constants":
        a = 2.0 * group["ps"] + 1.0 + 1e-4
        bg0 = 2.0 * group["ps"]
        bh0 = 2.0 * group["ghattg"] * group["ps"]
        return Constants(a, bg0, bh0, bg0 * a / (a - 1.0), bh0 * a / (a - 1.0))


@dataclass(frozen=True)
class StepScalars:
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
    def of(group: dict, t: int) -> "StepScalars":
        c = Constants.of(group)
        lr = float(group["lr"])
        return StepScalars(lr=lr, decay=1.0 - lr * group["weight_decay"], inv_a=1.0 / c.a, bg0=c.bg0,
                           bh0=c.bh0, rho1=t ** -group["tau1"], rho2=t ** -group["tau2"],
                           eps=group["eps"], first=t == 1, bg_first=c.bg_first, bh_first=c.bh_first)

    def fused_values(self, maximize: bool) -> tuple[float, ...]:
        """The fused kernels' scalars, in double precision, in their order."""
        return (self.lr, self.decay, self.inv_a, self.bg0, self.bh0, self.rho1, 1.0 - self.rho1, self.rho2,
                1.0 - self.rho2, self.eps, self.bg_first, self.bh_first, -1.0 if maximize else 1.0)


def single_tensor_update(param, grad, mug, bg, bhg, s: StepScalars, maximize: bool) -> None:
    """The spec's update of one tensor, in the state's dtype."""
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


def foreach_update(params, grads, mugs, bgs, bhgs, s: StepScalars, maximize: bool) -> None:
    """The same operations as `single_tensor_update`, in the same order, as foreach ops."""
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


CHUNK = 1 << 16
"""Elements per piece of the unfused CPU path: its ~8 temporaries (2 MiB in fp32) stay in
cache and below glibc's mmap threshold instead of being mapped and page-faulted per tensor."""


def unfused_update(params, grads, mugs, bgs, bhgs, s: StepScalars, maximize: bool, foreach: bool) -> None:
    """Per-tensor or foreach ops; on CPU over pieces of at most `CHUNK` elements (elementwise
    ops: the same bits as on whole tensors)."""
    cut = [piece for tensors in zip(params, grads, mugs, bgs, bhgs) for piece in pieces(tensors)]
    if not foreach:
        for piece in cut:
            single_tensor_update(*piece, s, maximize)
    elif params[0].device.type != "cpu":
        foreach_update(params, grads, mugs, bgs, bhgs, s, maximize)
    else:
        batch, size = [], 0
        for piece in cut:
            if batch and size + piece[0].numel() > CHUNK:
                foreach_update(*map(list, zip(*batch)), s, maximize)
                batch, size = [], 0
            batch.append(piece)
            size += piece[0].numel()
        foreach_update(*map(list, zip(*batch)), s, maximize)


def pieces(tensors: tuple) -> list[tuple]:
    """(param, grad, mug, bg, bhg) cut into 1-D pieces of at most `CHUNK` elements on CPU; as
    they are when small, on another device, or laid out differently from each other."""
    if tensors[0].device.type != "cpu" or tensors[0].numel() <= CHUNK:
        return [tensors]
    flat = flat_views(tensors)
    if flat is None:
        return [tensors]
    return [tuple(f[i:i + CHUNK] for f in flat) for i in range(0, flat[0].numel(), CHUNK)]


def flat_views(tensors) -> list[torch.Tensor] | None:
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
