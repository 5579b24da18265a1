"""Import ffcv without its one costly module-level line.

`ffcv.fields.rgb_image` keeps two constants ({'jpg': 0, 'raw': 1}) in a numba typed Dict
that only Python code reads. Building it compiles numba's dict operations: ~6 s of CPU in
every process that imports ffcv (the launcher checking the files, then each rank), more
than the rest of a short run's start-up. Executing that one module with `numba.typed.Dict`
bound to `dict` gives the same mapping at no cost; nothing else changes.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

MODULE = "ffcv.fields.rgb_image"


class PlainImageModes(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_with_plain_dict(module):
            typed = importlib.import_module("numba.typed")
            typed.Dict = dict
            try:
                exec_module(module)
            finally:
                del typed.Dict  # numba.typed resolves Dict lazily again

        spec.loader.exec_module = exec_with_plain_dict
        return spec


if not any(isinstance(f, PlainImageModes) for f in sys.meta_path):  # on import of vsgd_dist.data
    sys.meta_path.insert(0, PlainImageModes())
