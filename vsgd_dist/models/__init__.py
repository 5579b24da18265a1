"""Models the recipes select by name (`MODELS`): the demo's tiny ResNet, torchvision's
ResNet-18/50 and ViTs (DeiT-S/16 and ViT-B/16)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from vsgd_dist.models.blurpool import apply_blurpool
from vsgd_dist.models.drop_path import add_drop_path
from vsgd_dist.compat.torchvision import import_torchvision
from vsgd_dist.registry import Registry


@dataclass(frozen=True)
class ModelEntry:
    build: Callable[[int, int], nn.Module]
    """(num_classes, image_size) -> the model."""
    fixed_resolution: bool = False
    """True when the model only takes `image_size` inputs (ViT position embeddings), so the
    recipe's training and validation resolutions must all equal it."""
    drop_path: bool = False
    """True when the model is a torchvision VisionTransformer, which `model.drop_path`
    (stochastic depth, `drop_path.py`) applies to."""


MODELS: Registry[ModelEntry] = Registry("model")


def build_model(name: str, num_classes: int, image_size: int = 224, blurpool: bool = False,
                drop_path: float = 0.0, seed: int = 0) -> nn.Module:
    """The registered model; `blurpool`: with a blur before each strided convolution (ffcv-imagenet's
    ResNets, see `blurpool.py`); `drop_path`: with stochastic depth at this rate, its draws
    keyed by `seed` (ViTs, see `drop_path.py`)."""
    entry = MODELS.get(name)
    if drop_path and not entry.drop_path:
        raise ValueError(f"model {name} has no stochastic depth (drop_path); set it to 0")
    model = entry.build(num_classes, image_size)
    if drop_path:
        model = add_drop_path(model, drop_path, seed)
    return apply_blurpool(model) if blurpool else model


def _vit(num_heads: int, hidden_dim: int) -> Callable[[int, int], nn.Module]:
    def build(num_classes: int, image_size: int) -> nn.Module:
        import_torchvision()
        from torchvision.models.vision_transformer import VisionTransformer

        return VisionTransformer(image_size=image_size, patch_size=16, num_layers=12, num_heads=num_heads,
                                 hidden_dim=hidden_dim, mlp_dim=4 * hidden_dim, num_classes=num_classes)
    return build


def _torchvision_resnet(name: str) -> Callable[[int, int], nn.Module]:
    def build(num_classes: int, image_size: int) -> nn.Module:
        return getattr(import_torchvision().models, name)(num_classes=num_classes)
    return build


def _tiny_resnet(num_classes: int, image_size: int) -> nn.Module:
    return TinyResNet(num_classes, import_torchvision().models.resnet.BasicBlock)


MODELS.register("resnet_tiny", ModelEntry(_tiny_resnet))
MODELS.register("resnet18", ModelEntry(_torchvision_resnet("resnet18")))
MODELS.register("resnet50", ModelEntry(_torchvision_resnet("resnet50")))
MODELS.register("vit_s16", ModelEntry(_vit(num_heads=6, hidden_dim=384), fixed_resolution=True,  # DeiT-S
                                      drop_path=True))
MODELS.register("vit_b16", ModelEntry(_vit(num_heads=12, hidden_dim=768), fixed_resolution=True, drop_path=True))


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
