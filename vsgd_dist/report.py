"""Compare runs from their TensorBoard event files: a Markdown table and PNG plots.

Runs are grouped by their whole recipe except the seed and the run folder, so a sweep over
seeds reports mean and spread per group, and runs that differ in anything else (max_steps,
batch, data) are never averaged together: their rows name the keys that tell them apart.
"""
from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

RECIPE_FILE = "recipe.yaml"
# Not part of what a run is: the seed is what a group's members vary, the rest where and how it ran.
NOT_GROUPED = {"train.seed", "train.out", "train.progress"}
SCALARS = ("train/loss", "train/images_per_s", "val/top1", "val/top5", "optimizer/state_mib_per_rank")


@dataclass
class Run:
    path: Path
    label: str
    seed: int
    setting: dict = field(default_factory=dict)
    """The recipe as {dotted key: value}, without NOT_GROUPED: runs with equal settings are seeds
    of one row."""
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    wall_s: float = 0.0

    def final(self, tag: str) -> float:
        return self.curves[tag][-1][1] if self.curves.get(tag) else float("nan")

    def best(self, tag: str) -> float:
        return max(v for _, v in self.curves[tag]) if self.curves.get(tag) else float("nan")

    def mean_after_first(self, tag: str) -> float:
        """Mean of a logged rate without its first window (start-up and compilation)."""
        values = [v for _, v in self.curves.get(tag, [])][1:] or [v for _, v in self.curves.get(tag, [])]
        return statistics.fmean(values) if values else float("nan")


def find_runs(paths: list[str]) -> list[Path]:
    """Run folders (holding recipe.yaml and tb/) at or below the given paths."""
    found = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist; pass run folders (their out= paths) or a sweep folder")
        found += [r.parent for r in sorted(p.rglob(RECIPE_FILE)) if (r.parent / "tb").is_dir()]
    if not found:
        raise FileNotFoundError(f"no run folders (with {RECIPE_FILE} and tb/) under {', '.join(paths)}")
    return sorted(set(found))


def load_run(path: Path) -> Run:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = yaml.safe_load((path / RECIPE_FILE).read_text())
    label = f"{recipe['optim']['name']} ({recipe['engine']['name']}, {recipe['model']['name']}, lr {recipe['optim']['lr']:g})"
    acc = EventAccumulator(str(path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    setting = {k: v for k, v in _flatten(recipe).items() if k not in NOT_GROUPED}
    run = Run(path=path, label=label, seed=recipe["train"]["seed"], setting=setting)
    walls = []
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        if tag in SCALARS:
            run.curves[tag] = [(e.step, e.value) for e in events]
        walls += [e.wall_time for e in events]
    run.wall_s = max(walls) - min(walls) if walls else 0.0
    return run


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """{row label: runs with the same setting}; a label shared by several settings gets the
    keys (and values) that tell them apart appended."""
    by_setting: dict[str, list[Run]] = {}
    for run in runs:
        by_setting.setdefault(json.dumps(run.setting, sort_keys=True), []).append(run)
    groups = {}
    for members in by_setting.values():
        mine = members[0].setting
        twins = [m[0].setting for m in by_setting.values() if m[0].label == members[0].label and m[0].setting != mine]
        differing = sorted({k for other in twins for k in mine.keys() | other.keys() if mine.get(k) != other.get(k)})
        extra = "".join(f", {k}={mine.get(k)}" for k in differing)
        groups[members[0].label[:-1] + extra + ")"] = members
    return groups


def _mean_spread(values: list[float], fmt: str) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.fmean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def compare(paths: list[str], out: str | Path) -> str:
    """Write report.md and PNG plots into `out`; return the Markdown."""
    groups = group_runs([load_run(p) for p in find_runs(paths)])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| run | seeds | final top-1 | best top-1 | final top-5 | final train loss | images/s | "
             "train time (s) | optimizer state per rank (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
    for label, members in groups.items():
        lines.append(" | ".join([
            f"| {label}", str(len(members)),
            _mean_spread([r.final("val/top1") * 100 for r in members], ".2f"),
            _mean_spread([r.best("val/top1") * 100 for r in members], ".2f"),
            _mean_spread([r.final("val/top5") * 100 for r in members], ".2f"),
            _mean_spread([r.final("train/loss") for r in members], ".4f"),
            _mean_spread([r.mean_after_first("train/images_per_s") for r in members], ".0f"),
            _mean_spread([r.wall_s for r in members], ".0f"),
            _mean_spread([r.final("optimizer/state_mib_per_rank") for r in members], ".3f")]) + " |")
    lines.append("")
    lines += _throughput_ratios(groups)
    lines.append("")
    lines += [f"![{name}]({name}.png)" for name in _plot(groups, out)]
    markdown = "\n".join(lines) + "\n"
    (out / "report.md").write_text(markdown)
    return markdown


def _throughput_ratios(groups: dict[str, list[Run]]) -> list[str]:
    """VSGD images/s relative to AdamW on the same workload: the same setting apart from the
    optimizer's section and the recipe's description."""
    def workload(run: Run) -> dict:
        return {k: v for k, v in run.setting.items() if not k.startswith(("optim.", "recipe."))}

    lines = []
    for label, members in groups.items():
        if members[0].setting["optim.name"] != "vsgd":
            continue
        peers = [m for ms in groups.values() for m in ms
                 if m.setting["optim.name"] == "adamw" and workload(m) == workload(members[0])]
        if peers:
            context = re.sub(r", lr [^,]*", "", label.split("(", 1)[1][:-1])
            vsgd = statistics.fmean(r.mean_after_first("train/images_per_s") for r in members)
            adamw = statistics.fmean(r.mean_after_first("train/images_per_s") for r in peers)
            lines.append(f"VSGD throughput relative to AdamW ({context}): {vsgd / adamw:.3f}")
    return lines


def _plot(groups: dict[str, list[Run]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for tag, title in (("train/loss", "train loss"), ("val/top1", "val top-1"),
                       ("train/images_per_s", "throughput (images/s)")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (label, members) in enumerate(groups.items()):
            for j, run in enumerate(members):
                points = run.curves.get(tag, [])
                if points:
                    ax.plot(*zip(*points), color=f"C{i}", alpha=0.8, marker="o" if len(points) < 20 else None,
                            label=label if j == 0 else None)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        name = tag.replace("/", "_")
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
        names.append(name)
    return names
