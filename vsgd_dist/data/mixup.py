"""Mixup and CutMix of a train batch on the device, with soft targets (timm's Mixup in
"batch" mode, as DeiT trains).

Why on the device, per batch: both pair each image with another of the batch (the batch
reversed, as timm pairs them), so they need the whole batch, which is already on the device
as normalized images; the work is one elementwise pass (Mixup) or one box copy (CutMix). The
draws, Mixup or CutMix, the weight and the box, are one per optimizer step, keyed by (seed,
epoch, step in the epoch): every rank and micro-batch of a step mixes alike, at any world
size, and a resumed run redraws them. Which two images are paired follows the rank's
micro-batch, as in DeiT, where each GPU mixes its own batch.

Targets are one-hot labels mixed with the same weight, so each row sums to 1; label
smoothing is left to the loss (torch's cross-entropy with `label_smoothing` takes these
probability targets and smooths them as timm's mixup_target does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

_TAG = 0x4D49585550  # keeps these draws apart from any other user of (seed, epoch, step)


@dataclass(frozen=True)
class MixDraw:
    """One step's draw: the weight of each image against its partner, and for CutMix the box
    (top, bottom, left, right) pasted from the partner (its area makes up 1 - weight)."""

    weight: float
    box: tuple[int, int, int, int] | None = None


def mix_draw(seed: int, epoch: int, step: int, height: int, width: int, mixup_alpha: float,
             cutmix_alpha: float, switch_prob: float) -> MixDraw:
    """The draw of step `step` of `epoch` for images of height x width: CutMix with
    probability switch_prob when both are on (always when only it is), the weight ~
    Beta(alpha, alpha); CutMix's box as timm's rand_bbox places it (side ratio sqrt(1 -
    weight), centre uniform, clipped), its weight corrected to the box's real area."""
    rng = np.random.default_rng([seed, epoch, step, _TAG])
    cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or rng.random() < switch_prob)
    weight = float(rng.beta(cutmix_alpha, cutmix_alpha) if cutmix else rng.beta(mixup_alpha, mixup_alpha))
    if not cutmix:
        return MixDraw(weight)
    ratio = math.sqrt(1.0 - weight)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.random() * height), int(rng.random() * width)
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return MixDraw(1.0 - (bottom - top) * (right - left) / (height * width), (top, bottom, left, right))


def mix_batch(images: torch.Tensor, labels: torch.Tensor, num_classes: int,
              draw: MixDraw) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed images in their dtype and memory format, fp32 targets of shape (N, num_classes)):
    image i with image N-1-i. Mixup blends in fp32 and rounds once to the images' dtype."""
    partner = images.flip(0)
    if draw.box is None:
        mixed = (images.float() * draw.weight).add_(partner.float(), alpha=1.0 - draw.weight).to(images.dtype)
    else:
        top, bottom, left, right = draw.box
        mixed = images.clone()
        mixed[:, :, top:bottom, left:right] = partner[:, :, top:bottom, left:right]
    one_hot = torch.nn.functional.one_hot(labels, num_classes).float()
    return mixed, (one_hot * draw.weight).add_(one_hot.flip(0), alpha=1.0 - draw.weight)


class BatchMixer:
    """Mixup/CutMix for one run: `mixer(images, labels, epoch, step)` -> (images, targets)."""

    def __init__(self, num_classes: int, seed: int, mixup_alpha: float, cutmix_alpha: float, switch_prob: float):
        self.num_classes, self.seed = num_classes, seed
        self.mixup_alpha, self.cutmix_alpha, self.switch_prob = mixup_alpha, cutmix_alpha, switch_prob

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, step: int):
        draw = mix_draw(self.seed, epoch, step, images.shape[-2], images.shape[-1], self.mixup_alpha,
                        self.cutmix_alpha, self.switch_prob)
        return mix_batch(images, labels, self.num_classes, draw)
