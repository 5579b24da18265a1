"""vsgd-dist: VSGD (Variational SGD) and sharded AdamW for distributed training."""
from vsgd_dist.optim.ivon import IVON
from vsgd_dist.optim.vsgd import VSGD
from vsgd_dist.sharding import ZeroOptimizer

__all__ = ["IVON", "VSGD", "ZeroOptimizer"]
