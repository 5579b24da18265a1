"""Native ZeRO-1/2 for elementwise optimizers (flat buckets, even shards) and its resharding."""
from vsgd_dist.sharding.reshard import consolidate, shard_from_full
from vsgd_dist.sharding.zero import ZeroOptimizer

__all__ = ["ZeroOptimizer", "consolidate", "shard_from_full"]
