"""What VSGD's state says about training, per element: gradient SNR, posterior std, the Adam
beta1 it implies and the effective step size; as sums that add across shards and ranks."""
from __future__ import annotations

import torch

from vsgd_dist.optim.registry import Diagnostics
from vsgd_dist.optim.vsgd_update import Constants

__all__ = ["DIAGNOSTICS", "DIAGNOSTIC_NAMES", "diagnostic_fields", "diagnostic_means", "diagnostic_sums"]

STATE_KEYS = ("mug", "bg", "bhg")
DIAGNOSTIC_NAMES = ("count", "snr", "posterior_std", "implied_beta1", "effective_step")


@torch.no_grad()
def diagnostic_fields(mug, bg, bhg, *, lr: float, eps: float, ps: float, ghattg: float) -> dict:
    """Per-element diagnostics from the current state (for histograms).

    snr = mu^2 / sigma^2, posterior_std = sigma, implied_beta1 = B_h / (B_g + B_h) (Adam's
    beta1 that VSGD implies), effective_step = lr / (sqrt(sigma^2 + mu^2) + eps).
    Works on any tensor or slice, so a shard can compute its part.
    """
    c = Constants.of(dict(ps=ps, ghattg=ghattg))
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


def _diagnostic_fields(mug, bg, bhg, hp: dict) -> dict:
    return diagnostic_fields(mug, bg, bhg, lr=hp["lr"], eps=hp["eps"], ps=hp["ps"], ghattg=hp["ghattg"])


DIAGNOSTICS = Diagnostics(STATE_KEYS, _diagnostic_fields, {
    "snr": ("log10", -8.0, 4.0),
    "posterior_std": ("log10", -12.0, 2.0),
    "implied_beta1": ("linear", 0.0, 1.0),
    "effective_step": ("log10", -8.0, 2.0),
})
"""Gradient SNR, posterior std, implied Adam beta1 and effective step size, per layer."""
