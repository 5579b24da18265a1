"""Gradient transforms and their registry (see `registry`). Each module below registers itself
in `GRADIENT_TRANSFORMS`; its recipe section `RunConfig.<name>` is made from its entry."""
from vsgd_dist.transforms import svrg  # noqa: F401 - registration
from vsgd_dist.transforms.registry import (GRADIENT_TRANSFORMS, GradientTransform, ReportColumn, TransformContext,
                                           TransformEntry, build_transforms)
from vsgd_dist.transforms.svrg import AlphaSVRG, SVRGConfig

__all__ = ["GRADIENT_TRANSFORMS", "AlphaSVRG", "GradientTransform", "ReportColumn", "SVRGConfig", "TransformContext",
           "TransformEntry", "build_transforms"]
