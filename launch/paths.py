"""Folders the commands will create or write, checked before any work starts, so that a file
in the way or a read-only place is one line naming the path instead of a traceback."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


class PathProblem(ValueError):
    """A folder that cannot be created or written; the message names the path and the fix."""


def check_folder(path: str | os.PathLike, option: str) -> Path:
    """`path` as a folder this process can create or write into; else PathProblem naming
    `option` (how the user gave it, e.g. '--out' or 'out=')."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise PathProblem(f"{option} {path} is a file, not a folder; give a folder path (it is created if missing)")
    ancestor = path
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if ancestor != path and not ancestor.is_dir():
        raise PathProblem(f"{option} {path}: {ancestor} is a file, so no folder can be made under it; "
                          f"give another path")
    try:  # a real probe: permission bits say nothing for root, nor for read-only or virtual file systems
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=ancestor))
    except OSError as e:
        raise PathProblem(f"{option} {path}: no folder can be created in {ancestor} ({e.strerror}); "
                          f"give a folder you can write") from None
    return path


def describe_os_error(e: OSError) -> str:
    """One line for an operating-system error (the net under every command)."""
    where = f" {e.filename}" if e.filename else ""
    also = f" -> {e.filename2}" if getattr(e, "filename2", None) else ""
    return f"{e.strerror or type(e).__name__}:{where}{also} (check the path and its permissions)"
