"""Repeated augmentation (Hoffer et al., 2020; DeiT's RASampler): every image an epoch draws
is shown `repeats` times, each copy augmented differently, the copies on different ranks.

DeiT's RASampler permutes the dataset, repeats each index in place ([a, a, a, b, b, b, ...]),
deals that list out to the ranks round-robin (so an image's copies land on consecutive
ranks) and keeps len(dataset) / world_size indices per rank: an epoch is as long as without
repetition and shows about 1/repeats of the distinct images, each `repeats` times.
`RepeatedOrder` does the same with a permutation keyed by (seed, epoch), one list for every
world size (a global batch holds the same copies at any world size; only which rank decodes
which copy changes). It differs from DeiT in one place: DeiT first rounds the epoch down to
a multiple of 256 images, here the loader only drops the last incomplete batch.

Copies must get different crops and augmentations even where one rank holds several (fewer
ranks than repeats), so the order holds draw indices, copy c of sample i being
i + c * number of samples; the decoders (augment.py, `LabelDecoder`) read sample
index % number of samples and key their draws by the draw index.
"""
from __future__ import annotations

import numpy as np
import torch.distributed as dist
from ffcv.fields.basics import IntDecoder
from ffcv.traversal_order.base import TraversalOrder


def repeated_order(indices: np.ndarray, num_samples: int, repeats: int, seed: int, epoch: int, world: int,
                   rank: int) -> np.ndarray:
    """Rank `rank`'s draw indices for `epoch`, len(indices) // world of them: the samples
    `indices` (of a file of `num_samples`) permuted by (seed, epoch), each repeated in place
    as copies 0..repeats-1, dealt out round-robin."""
    order = np.random.default_rng([seed, epoch]).permutation(indices).astype(np.int64)
    copies = np.repeat(order, repeats) + num_samples * np.tile(np.arange(repeats), len(order))
    return copies[rank::world][:len(order) // world]


class RepeatedOrder(TraversalOrder):
    """`repeated_order` as an ffcv traversal order: pass an instance as Loader(order=...),
    which calls it with the loader."""

    def __init__(self, repeats: int, num_samples: int):
        self.repeats, self.num_samples = repeats, num_samples

    def __call__(self, loader) -> RepeatedOrder:
        super().__init__(loader)
        self.world, self.rank = (dist.get_world_size(), dist.get_rank()) if self.distributed else (1, 0)
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        return repeated_order(self.indices, self.num_samples, self.repeats, self.seed, epoch, self.world, self.rank)


class LabelDecoder(IntDecoder):
    """ffcv's IntDecoder for the label of the sample a draw index names (index % samples)."""

    def generate_code(self):
        def decode(indices, destination, metadata, storage_state):
            for k in range(len(indices)):
                destination[k] = metadata[np.int64(indices[k]) % len(metadata)]
            return destination[:len(indices)]

        return decode
