"""BlurPool (Zhang, "Making Convolutional Networks Shift-Invariant Again", 2019) as
ffcv-imagenet applies it to its ResNets: a fixed [1,2,1] x [1,2,1] / 16 blur (depthwise,
stride 1) before every strided convolution with at least 16 input channels, so downsampling
aliases less. It adds no parameters, only a buffer per wrapped convolution."""
from __future__ import annotations

import torch
from torch import nn


class BlurPoolConv2d(nn.Module):
    """`conv` applied to its input blurred by the fixed 3x3 binomial filter."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :]) / 16.0
        self.register_buffer("blur_filter", kernel.expand(conv.in_channels, 1, 3, 3).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blurred = nn.functional.conv2d(x, self.blur_filter.to(x.dtype), padding=1, groups=self.conv.in_channels)
        return self.conv(blurred)


def apply_blurpool(module: nn.Module) -> nn.Module:
    """Wrap, in place, every Conv2d with a stride above 1 and at least 16 input channels
    (ffcv-imagenet's rule: the 3-channel stem stays as it is); returns `module`."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(module, name, BlurPoolConv2d(child))
        else:
            apply_blurpool(child)
    return module
