"""Import torchvision on a CPU-only torch build.

torchvision 0.28's only wheel is built against CUDA torch; with the CPU torch its _C
extension fails to load and the import dies registering fake kernels for `torchvision::nms`,
an operator that then does not exist. Declaring the two missing operator schemas first makes
models and transforms import (the detection ops themselves still raise if called). On a
machine where torchvision loads normally this does nothing.

Written for torchvision 0.28.0 on torch 2.13.0+cpu. It can go when torchvision ships a wheel
built against CPU torch again (then torchvision imports on its own, and `import_torchvision`
is `import torchvision`); tests/test_compat.py fails when either pin changes.
"""
from __future__ import annotations

import importlib

import torch

WRITTEN_FOR = {"torchvision": "0.28.0", "torch": "2.13.0"}
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # kept alive: the schemas vanish when the Library object is collected


def import_torchvision():
    global _library
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as e:
        if "torchvision::nms" not in str(e) or torch.cuda.is_available():
            raise
    import sys

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS.values():
        _library.define(schema)
    return importlib.import_module("torchvision")
