"""The one exception type of the data layer.

A bad input must end with a message that names the problem and the fix, before an FFCV
Loader is built: an exception inside a Loader's worker threads hangs the loop instead.
"""
from __future__ import annotations


class DataError(ValueError):
    """A dataset file, folder or loader setting that cannot work; the message says why and
    what to do."""
