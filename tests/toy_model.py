"""A tiny ViT registered from outside the package (VSGD_DIST_PLUGINS=toy_model): torchvision's
VisionTransformer at 32 px (16 patches of 8 px, 2 blocks of width 32, 24k parameters), for
trainer tests on the digits demo that need a model without BatchNorm (an image's output does
not depend on the rest of its batch) or one with stochastic depth."""
from __future__ import annotations

from vsgd_dist.models import MODELS, ModelEntry
from vsgd_dist.compat.torchvision import import_torchvision


def tiny_vit(num_classes: int, image_size: int):
    import_torchvision()
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=image_size, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                             mlp_dim=64, num_classes=num_classes)


MODELS.register("vit_toy", ModelEntry(tiny_vit, fixed_resolution=True, drop_path=True))
