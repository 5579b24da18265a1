"""Gradient transforms and their registry. Each module below registers itself in
`GRADIENT_TRANSFORMS`; its recipe section is a field of `RunConfig` of the same name."""
from vsgd_dist.transforms import svrg  # noqa: F401 - registration
from vsgd_dist.transforms.registry import GRADIENT_TRANSFORMS, GradientTransform, TransformEntry, build_transforms
from vsgd_dist.transforms.svrg import AlphaSVRG, SVRGConfig

__all__ = ["GRADIENT_TRANSFORMS", "AlphaSVRG", "GradientTransform", "SVRGConfig", "TransformEntry",
           "build_transforms"]
