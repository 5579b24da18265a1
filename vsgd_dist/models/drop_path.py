"""Stochastic depth (drop path) for torchvision's VisionTransformer, with keyed draws.

As in timm's ViT (DeiT): each encoder block's two residual branches, attention and MLP, are
dropped per sample with the block's rate, the rates rising linearly over the blocks from 0
to `rate` (torch.linspace(0, rate, depth)), and kept branches are scaled by 1 / (1 - rate).

torchvision's StochasticDepth draws from the global generator. Here `DropPathDraws.draw`
draws the masks of every branch for one micro-batch at once, on the device, from Philox
(`vsgd_dist.optim.noise.philox4x32`) of (branch x sample position, epoch, step in the epoch,
the micro-batch's slot on this rank) under the seed: a run repeats and resumes bit for bit,
and a forward repeated on the same micro-batch (alpha-SVRG's passes, IVON's weight samples)
drops the same branches. Which image sits at a sample position depends on the rank layout,
so the masks an image gets do, too.
"""
from __future__ import annotations

import torch
from torch import nn

from vsgd_dist.optim.noise import philox4x32

_MASK32 = 0xFFFFFFFF
_TAG = 0x44524F50  # "DROP": keeps these draws apart from IVON's noise under the same seed


class DropPathDraws:
    """The keep masks, scaled, of every residual branch for the current micro-batch."""

    def __init__(self, rates: list[float], seed: int):
        self.rates, self.seed = rates, seed
        self.scales: torch.Tensor | None = None
        self._rates_on_device = torch.tensor(rates, dtype=torch.float64)[:, None]

    def draw(self, batch: int, epoch: int, step: int, slot: int, device: torch.device) -> None:
        """Masks for a micro-batch of `batch` samples: `slot` tells this rank's micro-batches of
        one step apart (and the ranks: rank x micro-batches per step + micro-batch)."""
        index = torch.arange(len(self.rates) * batch, dtype=torch.int64, device=device)
        word, _, _, _ = philox4x32(index, epoch & _MASK32, step & _MASK32, slot & _MASK32,
                                   self.seed & _MASK32, ((self.seed >> 32) ^ _TAG) & _MASK32)
        uniform = word.to(torch.float64).view(len(self.rates), batch) * 2.0 ** -32
        if self._rates_on_device.device != device:  # copied once: a copy from the host may wait for the GPU
            self._rates_on_device = self._rates_on_device.to(device)
        rates = self._rates_on_device
        self.scales = ((uniform >= rates) / (1.0 - rates)).float()

    def scaled(self, branch: torch.Tensor, site: int) -> torch.Tensor:
        """`branch` (N, tokens, dim) with dropped samples zeroed and kept ones scaled."""
        if self.scales is None or self.scales.shape[1] != branch.shape[0]:
            raise RuntimeError("drop path: draw() the masks of this micro-batch before a training forward")
        return branch * self.scales[site].to(branch.dtype).view(-1, 1, 1)


class DropPathBlock(nn.Module):
    """torchvision's EncoderBlock (the same submodules under the same names, so checkpoints
    and optimizer groups do not change) with its attention and MLP branches dropped in
    training at sites `sites` of `draws`."""

    def __init__(self, block: nn.Module, draws: DropPathDraws, sites: tuple[int, int]):
        super().__init__()
        self.ln_1, self.self_attention, self.dropout = block.ln_1, block.self_attention, block.dropout
        self.ln_2, self.mlp = block.ln_2, block.mlp
        self.draws, self.sites = draws, sites

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x)
        x = input + (self.draws.scaled(x, self.sites[0]) if self.training else x)
        y = self.mlp(self.ln_2(x))
        return x + (self.draws.scaled(y, self.sites[1]) if self.training else y)


def add_drop_path(model: nn.Module, rate: float, seed: int) -> nn.Module:
    """`model` (a torchvision VisionTransformer) with each encoder block's branches dropped
    at rates rising from 0 to `rate`; its `DropPathDraws` is `drop_path_draws(model)`."""
    layers = model.encoder.layers
    depth = len(layers)
    rates = [rate * i / (depth - 1) if depth > 1 else rate for i in range(depth)]
    draws = DropPathDraws([r for r in rates for _ in range(2)], seed)
    for i, (name, block) in enumerate(list(layers.named_children())):
        setattr(layers, name, DropPathBlock(block, draws, (2 * i, 2 * i + 1)))
    return model


def drop_path_draws(model: nn.Module) -> DropPathDraws | None:
    """The draws of a model made by `add_drop_path`, else None."""
    return next((m.draws for m in model.modules() if isinstance(m, DropPathBlock)), None)
