"""Models the recipes select by name."""
from __future__ import annotations

import torch
from torch import nn

from vsgd_dist.models.torchvision_import import import_torchvision


def build_model(name: str, num_classes: int, image_size: int = 224) -> nn.Module:
    """resnet_tiny (demo), torchvision resnet18/resnet50, DeiT-style vit_s16, vit_b16."""
    tv = import_torchvision()
    from torchvision.models import resnet, vision_transformer

    if name == "resnet18":
        return resnet.resnet18(num_classes=num_classes)
    if name == "resnet50":
        return resnet.resnet50(num_classes=num_classes)
    if name == "vit_s16":  # DeiT-S: ViT-B/16's blocks at width 384 with 6 heads
        return vision_transformer.VisionTransformer(image_size=image_size, patch_size=16, num_layers=12,
                                                    num_heads=6, hidden_dim=384, mlp_dim=1536,
                                                    num_classes=num_classes)
    if name == "vit_b16":
        return vision_transformer.VisionTransformer(image_size=image_size, patch_size=16, num_layers=12,
                                                    num_heads=12, hidden_dim=768, mlp_dim=3072,
                                                    num_classes=num_classes)
    if name == "resnet_tiny":
        return TinyResNet(num_classes, tv.models.resnet.BasicBlock)
    raise ValueError(f"unknown model {name!r}")


class TinyResNet(nn.Module):
    """A CIFAR-style ResNet from torchvision's BasicBlock: three stages (16, 32, 64
    channels), one block each, ~75k parameters; trains in minutes on 2 CPU cores."""

    def __init__(self, num_classes: int, block: type[nn.Module], widths=(16, 32, 64)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, in_ch = [], widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or in_ch != width:
                down = nn.Sequential(nn.Conv2d(in_ch, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width))
            stages.append(block(in_ch, width, stride=stride, downsample=down))
            in_ch = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def layer_group(name: str) -> str:
    """The layer group a parameter is reported under (VSGD diagnostics): its top two
    module levels, e.g. `stages.1`, `encoder.layers`, `head`."""
    parts = name.split(".")[:-1] or ["root"]
    return ".".join(parts[:2])
