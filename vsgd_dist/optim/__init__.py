"""Optimizers and their registry. Each module below registers itself in `OPTIMIZERS`."""
from vsgd_dist.optim import adamw, ivon, sgd, vsgd  # noqa: F401 - registration
from vsgd_dist.optim.param_groups import named_param_groups
from vsgd_dist.optim.registry import OPTIMIZERS, OptimizerEntry, Sampler
from vsgd_dist.optim.ivon import IVON
from vsgd_dist.optim.vsgd import VSGD
from vsgd_dist.optim.vsgd_diagnostics import diagnostic_fields, diagnostic_means, diagnostic_sums

__all__ = ["IVON", "OPTIMIZERS", "OptimizerEntry", "Sampler", "VSGD", "diagnostic_fields", "diagnostic_means", "diagnostic_sums",
           "named_param_groups"]
