"""vsgd_dist/compat/ holds every patch of an upstream library and every use of a private
upstream name: each module says which versions it was written for (and fails here when a pin
moves, so the patch is looked at again), and no module outside compat/ reaches into a
library's private names."""
from __future__ import annotations

import ast
import re
import importlib
import importlib.metadata
import pkgutil
from pathlib import Path

import pytest

import vsgd_dist.compat

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["vsgd_dist", "launch", "bench"]
UPSTREAM = {"torch", "torchvision", "ffcv", "numba", "deepspeed", "submitit", "triton", "numpy", "tensorboard",
            "omegaconf", "yaml", "cv2", "PIL", "sklearn", "matplotlib", "tqdm"}
"""Third-party libraries whose private names count."""
PUBLIC_BY_CONVENTION = ("_foreach_",)
"""torch's multi-tensor ops: underscored, but what torch.optim's own optimizers call."""
DOCUMENTED_SETTINGS = ("torch.backends.",)
"""Attributes a library documents as settings to assign (cudnn.benchmark, allow_tf32, ...)."""
COMPAT_MODULES = [m.name for m in pkgutil.iter_modules(vsgd_dist.compat.__path__)]


def public(version: str) -> str:
    return version.split("+")[0]  # torch's local tag (+cpu, +cu130) is the build, not the version


@pytest.mark.parametrize("name", COMPAT_MODULES)
def test_each_shim_says_what_it_was_written_for_and_the_pins_still_hold(name):
    module = importlib.import_module(f"vsgd_dist.compat.{name}")
    assert module.WRITTEN_FOR, f"vsgd_dist/compat/{name}.py: WRITTEN_FOR names no library"
    assert "can go" in module.__doc__.lower(), f"vsgd_dist/compat/{name}.py: its docstring must say when it can go"
    for library, version in module.WRITTEN_FOR.items():
        installed = public(importlib.metadata.version(library))
        assert installed == version, (f"{library} is {installed}, vsgd_dist/compat/{name}.py was written for "
                                      f"{version}: check the patch against the new version, then update WRITTEN_FOR")


def private_upstream_uses(source: str, name: str) -> list[str]:
    """`from lib import _x`, `import lib._x`, `lib._x`, getattr/setattr/hasattr(obj, "_x") on
    anything but self/cls, and assignments to a library's attributes."""
    tree = ast.parse(source)
    names: set[str] = set()  # local names bound to an upstream module or object
    found = []

    def where(node, what):
        found.append(f"{name}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UPSTREAM:
                    names.add((alias.asname or alias.name).split(".")[0])
                    if any(part.startswith("_") for part in alias.name.split(".")):
                        where(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in UPSTREAM:
            if any(part.startswith("_") for part in node.module.split(".")):
                where(node, f"from {node.module} import ...")
            for alias in node.names:
                if alias.name.startswith("_"):
                    where(node, f"from {node.module} import {alias.name}")
                names.add(alias.asname or alias.name)

    def rooted_in_library(node) -> bool:
        while isinstance(node, ast.Attribute):
            node = node.value
        return isinstance(node, ast.Name) and node.id in names

    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and not node.attr.startswith(PUBLIC_BY_CONVENTION) and rooted_in_library(node.value)):
            where(node, ast.unparse(node))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and node.args[1].value.startswith("_") and not node.args[1].value.startswith("__")
              and not (isinstance(node.args[0], ast.Name) and node.args[0].id in ("self", "cls"))):
            where(node, ast.unparse(node))
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if (isinstance(target, ast.Attribute) and rooted_in_library(target.value)
                        and not ast.unparse(target).startswith(DOCUMENTED_SETTINGS)):
                    where(node, f"assigns {ast.unparse(target)}")
    return found


def test_no_private_upstream_name_outside_compat():
    files = [p for d in SOURCES for p in sorted((REPO / d).rglob("*.py")) if "compat" not in p.parts]
    found = [use for p in files for use in private_upstream_uses(p.read_text(), str(p.relative_to(REPO)))]
    assert not found, "private upstream names belong in vsgd_dist/compat/ (one module per library):\n" + "\n".join(found)


def test_the_checker_finds_each_kind_of_private_use():
    sample = ("import torch\nimport submitit.slurm.slurm as s\nfrom ffcv.x import _y\n"
              "from torch.distributed.tensor._utils import f\ntorch._C\ngetattr(s, '_hp')\n"
              "s.Thing = 1\ntorch._foreach_add_\ntorch.backends.cudnn.benchmark = True\ngetattr(self, '_mine')\n")
    found = sorted(use.split(": ", 1)[1] for use in private_upstream_uses(sample, "sample.py"))
    assert found == sorted(["from ffcv.x import _y", "from torch.distributed.tensor._utils import ...", "torch._C",
                            "getattr(s, '_hp')", "assigns s.Thing"])


def test_the_repository_stands_alone():
    """No tracked file points outside the repository or to an issue tracker's numbers: what
    the code relies on is written in its own docs."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"\.\./shared|shared/docs|\b[Ii]ssue \d+|#\d{2,}\b(?!\w)")
    found = [f"{name}:{i}" for name in files if name.endswith((".py", ".md", ".sh", ".yaml", ".toml", ".txt"))
             and (REPO / name).is_file()
             for i, line in enumerate((REPO / name).read_text(errors="replace").splitlines(), 1)
             if pattern.search(line) and name != "tests/test_compat.py"]
    assert not found, found
