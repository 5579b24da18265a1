"""ffcv 1.0.2's OSCacheManager types its reader by setting `mutable = False` on numba's
interned `nb.uint8[::1]`, which changes the one instance numba shares: every uint8 1-D array
typed afterwards counts as read-only, and as a numba type hashes by its fields, a compiled
function whose signature held that type before has a dict key whose hash moved (a KeyError
when numba next walks its overloads: "Exception ignored in finalize", or a compile failing in
a decoding thread). Importing this module gives OSCacheManager the same reader typed with a
read-only array type of its own. Imported by augment.py, before any loader is built.
"""
from __future__ import annotations

import numpy as np
from ffcv.memory_managers.os_cache import OSCacheManager
from ffcv.pipeline.compiler import Compiler
from numba.core import types

_DATA = types.Array(types.uint8, 1, "C", readonly=True)
"""The memory-mapped file and each sample's bytes in it."""
_POINTERS = types.Array(types.uint64, 1, "C")
"""Sample offsets and sizes (mutable, as ffcv leaves them)."""


def compile_reader(self):
    """OSCacheManager.compile_reader: a sample's bytes from its address in the file."""
    def read(address, mem_state):
        size = mem_state[2][np.searchsorted(mem_state[1], address)]
        return mem_state[0][address:address + size]

    return Compiler.compile(read, _DATA(types.uint64, types.Tuple([_DATA, _POINTERS, _POINTERS])))


OSCacheManager.compile_reader = compile_reader
