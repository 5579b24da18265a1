"""The shape of the code: modules import on their own with no cycle, collectives live in one
place, and a component registered outside the package runs through the real launcher."""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vsgd_dist", "launch")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """Our modules that `name` imports anywhere in its body (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def test_no_module_imports_a_module_that_imports_it_back():
    modules = our_modules()
    graph = {name: imports_of(name, path, set(modules)) for name, path in modules.items()}
    # A package's __init__ re-exporting its own submodules is not a cycle that can bite:
    # the submodule never needs the package's namespace to be complete.
    graph = {name: {t for t in targets if not (path.name == "__init__.py" and t.startswith(name + "."))}
             for (name, targets), path in zip(graph.items(), modules.values())}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_every_module_imports_on_its_own_and_in_any_order():
    names = sorted(our_modules())
    alone = ["vsgd_dist.train.dcp_state", "vsgd_dist.engines.base", "vsgd_dist.config", "vsgd_dist.train.trainer",
             "vsgd_dist.sharding.reshard"]
    for script in [f"import {name}" for name in alone] + [
            "import importlib\nfor n in %r: importlib.import_module(n)" % order for order in (names, names[::-1])]:
        result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (script[:80], result.stderr[-2000:])


COLLECTIVE = re.compile(r"\bdist\.(all_reduce|all_gather\w*|broadcast\w*|reduce_scatter\w*|reduce|gather\w*|"
                        r"scatter\w*|all_to_all\w*|send|recv|isend|irecv)\(")


def test_collectives_go_through_the_helpers_or_the_engines():
    """NCCL reduces CUDA tensors only: a host value must go through vsgd_dist.distributed,
    which sends it to the group's CPU side. Only the engines and the sharding code, which
    reduce device tensors they own, call torch.distributed's collectives directly."""
    allowed = ("vsgd_dist/distributed.py", "vsgd_dist/engines/", "vsgd_dist/sharding/")
    offenders = [f"{path.relative_to(ROOT)}:{i}" for path in our_modules().values()
                 if not str(path.relative_to(ROOT)).startswith(allowed)
                 for i, line in enumerate(path.read_text().splitlines(), 1) if COLLECTIVE.search(line)]
    assert not offenders, offenders


SHARDING_ENGINES = ["zero", "fsdp2", "deepspeed"]
"""Each keeps the optimizer's state in its own sharded form (DDP steps the plain optimizer on
full weights, as in every single-process test)."""


def launch_run(out: Path, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VSGD_DIST_PLUGINS": "toy_optimizer",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "launch", "run", "recipes/demo.yaml", "--nproc", str(nproc),
                           f"out={out}", "optimizer=toy_sign", "optim.toy_sign.beta=0.8", "lr=0.003",
                           "train.progress=false", "train.log_every=2", *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.dist
@pytest.mark.timeout(900)
@pytest.mark.parametrize("engine", SHARDING_ENGINES)
def test_an_optimizer_registered_outside_trains_on_every_sharding_engine_and_reshards(engine, tmp_path):
    """One registration (tests/toy_optimizer.py) is all it takes: recipe keys, every engine's
    sharded state, checkpoints that reshard (2 ranks -> 1) and resume. The reshard is exact:
    1 rank loading the 2-rank checkpoint and saving it at once writes the same weights and
    momentum, bit for bit."""
    from vsgd_dist.train.checkpoint import latest_checkpoint, read_full, read_meta

    def consolidated(run: Path) -> tuple[dict, dict]:
        full = read_full(latest_checkpoint(run / "checkpoints"))
        return full["meta"], full

    out = tmp_path / "run"
    first = launch_run(out, 2, f"engine={engine}", "max_steps=6", "train.stop_at=4")
    assert first.returncode == 0, first.stderr[-3000:]
    meta, written = consolidated(out)
    assert meta["optimizer_class"] == "toy_optimizer.SignMomentum" and (meta["world_size"], meta["step"]) == (2, 4)
    assert all(set(state) == {"step", "momentum"} and state["momentum"].abs().sum() > 0
               for state in written["optimizer"].values())

    shutil.copytree(out, tmp_path / "resharded")
    resharded = launch_run(tmp_path / "resharded", 1, f"engine={engine}", "max_steps=4")
    assert resharded.returncode == 0, resharded.stderr[-3000:]
    meta, loaded = consolidated(tmp_path / "resharded")
    assert (meta["world_size"], meta["step"]) == (1, 4)
    for name, weight in written["model"].items():
        assert torch.equal(loaded["model"][name], weight), name
    for name, state in written["optimizer"].items():
        assert torch.equal(loaded["optimizer"][name]["momentum"], state["momentum"]), name

    resumed = launch_run(out, 1, f"engine={engine}", "max_steps=6")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "completed at step 6" in resumed.stdout
    meta = read_meta(latest_checkpoint(out / "checkpoints"))
    assert meta["world_size"] == 1 and meta["step"] == 6


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_an_optimizer_registered_outside_validates_its_values_in_the_launcher(tmp_path):
    bad = launch_run(tmp_path / "bad", 2, "optim.toy_sign.beta=1.5")
    assert bad.returncode == 2 and "optim.toy_sign: SignMomentum: invalid beta=1.5" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()


def launch_plugin(plugin: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VSGD_DIST_PLUGINS": plugin,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def sampling_run(out: Path, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    return launch_plugin("toy_sampling_optimizer", "run", "recipes/demo.yaml", "--nproc", str(nproc), f"out={out}",
                         "optimizer=toy_antithetic", "optim.toy_antithetic.spread=0.02", "lr=0.003",
                         "train.global_batch=48", "train.val_mc_samples=2", "train.progress=false",
                         "train.log_every=2", *overrides)


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("engine", ["zero", "fsdp2", "ddp"])
def test_a_sampling_optimizer_registered_outside_trains_reshards_and_is_compared(engine, tmp_path):
    """One file (tests/toy_sampling_optimizer.py) declares a sampler in its registry entry:
    the engines train at its weight samples, checkpoints carry its state to another world size
    (2 ranks -> 1), validation adds its posterior predictive, and `launch compare` shows it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vsgd_dist.train.checkpoint import latest_checkpoint, read_full

    out = tmp_path / "run"
    first = sampling_run(out, 2, f"engine={engine}", "max_steps=6", "train.stop_at=4")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = sampling_run(out, 1, f"engine={engine}", "max_steps=6")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "completed at step 6" in resumed.stdout

    full = read_full(latest_checkpoint(out / "checkpoints"))
    meta = full["meta"]
    assert meta["optimizer_class"] == "toy_sampling_optimizer.AntitheticSGD"
    assert (meta["world_size"], meta["step"]) == (1, 6)
    for name, state in full["optimizer"].items():  # its per-element state, whole at the new world size
        assert state["momentum"].shape == full["model"][name].shape and int(state["step"]) == 6, name
        assert state["momentum"].abs().sum() > 0, name
    assert [g["mc_samples"] for g in full["param_groups"]] == [2, 2]

    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert {"val/predictive_top1", "val/predictive_nll"} <= set(acc.Tags()["scalars"])
    compared = launch_plugin("toy_sampling_optimizer", "compare", str(out), "--out", str(tmp_path / "report"))
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert f"toy_antithetic ({engine}, resnet_tiny" in compared.stdout and "predictive top-1" in compared.stdout
