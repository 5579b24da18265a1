"""Training at weight samples (IVON), around any engine's step protocol.

An optimizer declares that it samples with a `Sampler` in its registry entry; the engine
hands out the form of it that drives its optimizer (`Engine.sampler`: the entry's, or
ZeRO's sharded one). Per step the loop runs

    for k in range(sampling.mc_samples):
        sampling.sample(k)                # the model holds m_w + eps
        ... forward/backward of the micro-batches (engine.no_sync, engine.backward) ...
        if k + 1 < sampling.mc_samples:
            sampling.accumulate()         # clip this sample's gradient, add it to the sums
    engine.step()

For an optimizer that trains at the mean, `mc_samples` is 1 and the rest do nothing but
`mean_weights()`, which waits for a prefetched gather (ZeRO's engine.prefetch_params).
"""
from __future__ import annotations

from vsgd_dist.engines.base import Engine


class WeightSampling:
    def __init__(self, engine: Engine, grad_clip: float = 0.0):
        self.engine = engine
        self.sampler = engine.sampler
        self.grad_clip = grad_clip
        """Each sample's gradient is clipped to this global norm, as a step's is (0: off)."""

    @property
    def samples(self) -> bool:
        """Whether the optimizer trains at weight samples (validation then adds the
        posterior predictive)."""
        return self.sampler is not None

    @property
    def mc_samples(self) -> int:
        """Forward/backward passes per step: the optimizer's weight samples, else 1."""
        return self.sampler.mc_samples(self.engine.optimizer) if self.sampler else 1

    def sample(self, mc_sample: int, evaluation: bool = False) -> None:
        """Before the forward of weight sample `mc_sample`: the model holds m_w + eps. With
        `evaluation`, a posterior-predictive sample (its own noise; `mean_weights()` after)."""
        if self.sampler:
            self.sampler.sample(self.engine.optimizer, mc_sample, evaluation=evaluation)

    def accumulate(self) -> None:
        """After the backward of every weight sample but the last: its gradient, clipped like
        a step's (`grad_clip`), goes into the step's sums."""
        if self.sampler:
            if self.grad_clip > 0:
                self.engine.clip_grad_norm(self.grad_clip)
            self.sampler.accumulate(self.engine.optimizer)

    def mean_weights(self) -> None:
        """Make the model hold the mean weights: after evaluation samples, and before anything
        reads the weights after a step (ZeRO defers that all-gather to the next sample)."""
        if self.sampler:
            self.sampler.mean_weights(self.engine.optimizer)
        self.engine.wait_for_parameters()
