"""Optimizers: VSGD and the registry the trainer picks from."""
from vsgd_dist.optim.vsgd import VSGD, diagnostic_fields, diagnostic_means, diagnostic_sums

__all__ = ["VSGD", "diagnostic_fields", "diagnostic_means", "diagnostic_sums"]
