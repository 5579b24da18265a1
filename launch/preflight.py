"""What `launch run` checks before any process starts, done by `submit` and `sweep` before
anything is queued: a job that cannot start should fail here, not after hours in the queue.

The recipe itself (keys, values, optimizer hyperparameters, batch divisibility at the
requested world size) is checked by `resolve_recipe`; data-loading threads against the
profile's cores by `check_data_workers`; the run folder by `claim_run_dir`. This module adds
the data folder (manifest and .beton files), which the login node must be able to see;
`--no-data-check` skips it on clusters whose login nodes cannot.
"""
from __future__ import annotations

from pathlib import Path

from launch.resolve import DEFAULT_TRAINER, RecipeError

NO_DATA_CHECK = "--no-data-check"
DEMO = "(the built-in digits demo)"


def data_problem(recipe: dict, trainer: str) -> str | None:
    """Why the recipe's data cannot be read from here (None: it can, or not our trainer's)."""
    if trainer != DEFAULT_TRAINER:
        return None
    from vsgd_dist.config import config_from_dict
    from vsgd_dist.data import DataError, inspect_beton, resolve_dataset

    try:
        files = resolve_dataset(config_from_dict(recipe).data)
        for split in (files.train, files.val):
            inspect_beton(split)
    except DataError as e:
        return str(e)
    return None


def check_data(recipe: dict, trainer: str) -> None:
    """Raise RecipeError when the job's data cannot be read (the job would fail on its node)."""
    problem = data_problem(recipe, trainer)
    if problem:
        raise RecipeError(f"{problem} (the job would fail on its node; pass {NO_DATA_CHECK} if only "
                          f"the compute nodes can see the data)")


def place_paths(recipe: dict, run_dir: Path, trainer: str) -> dict:
    """The recipe as the job runs it: train.out is the job's run folder (what training writes
    to) and a relative data.data_dir is made absolute, as the job may start elsewhere."""
    if trainer != DEFAULT_TRAINER:
        return recipe
    data_dir = recipe["data"]["data_dir"]
    data = {**recipe["data"], "data_dir": str(Path(data_dir).resolve()) if data_dir else ""}
    return {**recipe, "data": data, "train": {**recipe["train"], "out": str(run_dir)}}


def data_problems(recipes: list[dict], trainer: str) -> dict[str, str]:
    """Data folder ('(the built-in digits demo)' for none) -> why it cannot be read from here,
    for each distinct folder the recipes name that cannot be."""
    problems = {}
    for recipe in recipes:
        folder = recipe.get("data", {}).get("data_dir") or DEMO
        if folder not in problems:
            problems[folder] = data_problem(recipe, trainer)
    return {folder: problem for folder, problem in problems.items() if problem}
