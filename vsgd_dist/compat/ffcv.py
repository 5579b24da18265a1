"""Two fixes to ffcv 1.0.2, applied by `vsgd_dist.data` on import (before any loader exists).

1. A cheaper import. `ffcv.fields.rgb_image` keeps two constants ({'jpg': 0, 'raw': 1}) in a
   numba typed Dict that only Python code reads. Building it compiles numba's dict operations:
   ~6 s of CPU in every process that imports ffcv (the launcher checking the files, then each
   rank), more than the rest of a short run's start-up. `install_cheap_import()` executes that
   one module with `numba.typed.Dict` bound to `dict`: the same mapping at no cost.
2. The reader's type. OSCacheManager types its reader by setting `mutable = False` on numba's
   interned `nb.uint8[::1]`, which changes the one instance numba shares: every uint8 1-D array
   typed afterwards counts as read-only, and as a numba type hashes by its fields, a compiled
   function whose signature held that type has a dict key whose hash moved (a KeyError when
   numba next walks its overloads: "Exception ignored in finalize", or a compile failing in a
   decoding thread). `fix_reader_type()` gives OSCacheManager the same reader typed with a
   read-only array type of its own.

Written for ffcv 1.0.2 with numba 0.68.1. Both can go when ffcv builds its constants as a
plain dict and types its reader without mutating numba's interned type (neither is fixed in
ffcv's last release); tests/test_compat.py fails when either pin changes, so that this is
looked at again.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

WRITTEN_FOR = {"ffcv": "1.0.2", "numba": "0.68.1"}
RGB_IMAGE_MODULE = "ffcv.fields.rgb_image"


class PlainImageModes(importlib.abc.MetaPathFinder):
    """Finds `ffcv.fields.rgb_image` and executes it with numba's typed Dict as a plain dict."""

    def find_spec(self, name, path, target=None):
        if name != RGB_IMAGE_MODULE:
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


def install_cheap_import() -> None:
    """Before ffcv is imported: its rgb_image module will skip numba's dict compilation."""
    if not any(isinstance(f, PlainImageModes) for f in sys.meta_path):
        sys.meta_path.insert(0, PlainImageModes())


def fix_reader_type() -> None:
    """OSCacheManager.compile_reader with a read-only array type of its own (idempotent)."""
    import numpy as np
    from ffcv.memory_managers.os_cache import OSCacheManager
    from ffcv.pipeline.compiler import Compiler
    from numba.core import types

    data = types.Array(types.uint8, 1, "C", readonly=True)  # the memory-mapped file, a sample's bytes
    pointers = types.Array(types.uint64, 1, "C")  # sample offsets and sizes (mutable, as ffcv leaves them)

    def compile_reader(self):
        """A sample's bytes from its address in the file."""
        def read(address, mem_state):
            size = mem_state[2][np.searchsorted(mem_state[1], address)]
            return mem_state[0][address:address + size]

        return Compiler.compile(read, data(types.uint64, types.Tuple([data, pointers, pointers])))

    OSCacheManager.compile_reader = compile_reader
