"""vsgd-dist: VSGD (Variational SGD) and sharded AdamW for distributed training."""
from vsgd_dist.optim.vsgd import VSGD

__all__ = ["VSGD"]
