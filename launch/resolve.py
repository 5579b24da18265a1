"""Turn a recipe file plus `key=value` overrides into the plain dict a job receives.

This is the one place `launch submit`/`sweep` read recipes. For the real trainer the
recipe goes through the trainer's own loader and validation (`vsgd_dist.config`), so a
bad recipe fails before submission exactly as it does for `launch run`; another trainer
(`--trainer`, e.g. the tests' toy) gets the YAML with dotted overrides applied.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml


DEFAULT_TRAINER = "vsgd_dist.train.trainer:Trainer"


class RecipeError(ValueError):
    """A recipe or override problem, worded for the command line."""


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=3` -> ("a.b", 3); the value is read as YAML so numbers and lists keep their type."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part.isidentifier() for part in key.split(".")):
        raise RecipeError(f"override {text!r} is not key=value (e.g. optim.lr=0.1)")
    try:
        return key, yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"override {text!r}: value is not valid YAML ({e.problem})") from None


def apply_overrides(recipe: dict, overrides: list[str]) -> dict:
    """Return a copy of `recipe` with dotted overrides set (missing levels are created)."""
    out = copy.deepcopy(recipe)
    for text in overrides:
        key, value = parse_override(text)
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"override {text!r}: {part!r} is a {type(child).__name__}, not a mapping")
            node = child
        node[leaf] = value
    return out


def refuse_run_folder_override(overrides: list[str]) -> None:
    """A job's run folder is always <job folder>/run (--out names the job folder), so an
    `out=` override, which names the run folder for `launch run`, would be ignored."""
    for text in overrides:
        key, _, value = text.partition("=")
        if key.strip() in ("out", "train.out"):
            raise RecipeError(f"override {text!r} names launch run's run folder; a SLURM job takes its folder "
                              f"as --out {value or 'DIR'} (training writes to its run/)")


def check_data_workers(recipe: dict, cores: int, where: str) -> None:
    """Refuse more decoding threads per rank (data.num_workers) than the cores a rank has:
    the data loader (numba) cannot start them, and would fail only inside the ranks."""
    workers = recipe.get("data", {}).get("num_workers")
    if workers is not None and workers > cores:
        raise RecipeError(f"data.num_workers={workers} is more than the {cores} cores {where}; "
                          f"set data.num_workers={cores} or fewer")


def resolve_recipe(path: str | Path, overrides: list[str], trainer: str, world_size: int) -> dict:
    """Load the recipe at `path`, apply `overrides`; raise RecipeError naming the fix."""
    refuse_run_folder_override(overrides)
    if trainer == DEFAULT_TRAINER:
        from vsgd_dist.config import ConfigError, load_recipe

        try:
            return load_recipe(path, overrides, world_size=world_size).to_dict()
        except ConfigError as e:
            raise RecipeError(str(e)) from None
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r} not found; pass a YAML file (see recipes/)")
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(recipe, dict):
        raise RecipeError(f"recipe {str(path)!r} must be a YAML mapping (key: value), "
                          f"got {type(recipe).__name__}")
    return apply_overrides(recipe, overrides)
