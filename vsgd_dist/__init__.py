"""vsgd-dist: VSGD (Variational SGD) and sharded AdamW for distributed training."""
