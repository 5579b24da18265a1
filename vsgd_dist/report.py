"""Compare runs from their TensorBoard event files: a Markdown table and PNG plots.

The table puts the optimizers side by side: accuracy, NLL and calibration (ECE) at the final
validation, and for optimizers that train at weight samples (IVON) the same for the
posterior predictive; throughput relative to AdamW on the same workload.

Runs are grouped by their whole recipe except the seed and the run folder, so a sweep over
seeds reports mean and spread per group, and runs that differ in anything else (max_steps,
batch, data) are never averaged together: their rows name the keys that tell them apart.
"""
from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vsgd_dist.registry import import_plugins
from vsgd_dist.transforms import GRADIENT_TRANSFORMS

import_plugins()  # gradient transforms registered outside the package bring their own columns
RECIPE_FILE = "recipe.yaml"
# Not part of what a run is: the seed is what a group's members vary, the rest where and how it ran.
NOT_GROUPED = {"train.seed", "train.out", "train.progress"}
SCALARS = ("train/loss", "train/images_per_s", "val/top1", "val/top5", "val/nll", "val/ece", "val/predictive_top1",
           "val/predictive_nll", "val/predictive_ece", "optimizer/state_mib_per_rank",
           *(tag for _, entry in GRADIENT_TRANSFORMS.items() for tag in
             {entry.extra_steps_tag, *(c.tag for c in entry.columns)} - {""}))
# (header, tag, scale, format) of the table's metric columns, all at the final validation;
# "predictive" is the posterior predictive of optimizers that train at weight samples (IVON).
EXTRA_STEPS_TAGS = tuple(e.extra_steps_tag for _, e in GRADIENT_TRANSFORMS.items() if e.extra_steps_tag)
"""Cumulative extra forward/backward passes of gradient transforms, in steps' worth."""
FINAL_COLUMNS = (("final top-5", "val/top5", 100, ".2f"), ("NLL", "val/nll", 1, ".4f"),
                 ("ECE (%)", "val/ece", 100, ".2f"), ("predictive top-1", "val/predictive_top1", 100, ".2f"),
                 ("predictive NLL", "val/predictive_nll", 1, ".4f"),
                 ("predictive ECE (%)", "val/predictive_ece", 100, ".2f"))


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

    def loss_at_compute(self) -> list[tuple[float, float]]:
        """(compute, train loss), compute in steps' worth of forward/backward passes: the step
        plus the passes gradient transforms added by then (`TransformEntry.extra_steps_tag`)."""
        extras = [dict(self.curves.get(tag, [])) for tag in EXTRA_STEPS_TAGS]
        return [(step + sum(extra.get(step, 0.0) for extra in extras), loss)
                for step, loss in self.curves.get("train/loss", [])]

    def extra_compute(self) -> bool:
        return any(self.curves.get(tag) for tag in EXTRA_STEPS_TAGS)

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
    label = f"{_optimizer_label(recipe)} ({recipe['engine']['name']}, {recipe['model']['name']}, lr {recipe['optim']['lr']:g})"
    acc = EventAccumulator(str(path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    setting = {k: v for k, v in _flatten(recipe).items() if k not in NOT_GROUPED}
    run = Run(path=path, label=label, seed=recipe["train"]["seed"], setting=setting)
    walls = []
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        if tag in SCALARS + MINIVAL_SCALARS:
            run.curves[tag] = [(e.step, e.value) for e in events]
        walls += [e.wall_time for e in events]
    run.wall_s = max(walls) - min(walls) if walls else 0.0
    return run


def _optimizer_label(recipe: dict) -> str:
    """The optimizer's name, with the gradient transforms that feed it, each as its entry
    labels itself ("vsgd + <label of the transform>")."""
    sections = [(entry, entry.section(recipe.get(name))) for name, entry in GRADIENT_TRANSFORMS.items()]
    return " + ".join([recipe["optim"]["name"], *(entry.label(s) for entry, s in sections if entry.enabled(s))])


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


def _save(fig, ax, path: Path) -> None:
    """Grid, legend, tight layout, PNG at 100 dpi, figure closed: every report plot ends so."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(paths: list[str], out: str | Path) -> str:
    """Write report.md and PNG plots into `out`; return the Markdown."""
    groups = group_runs([load_run(p) for p in find_runs(paths)])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Columns no run logged (the predictive ones without IVON, NLL in older runs) are left out.
    columns = [c for c in FINAL_COLUMNS if any(r.curves.get(c[1]) for rs in groups.values() for r in rs)]
    # Runs that cost more per step (a gradient transform's extra passes) are also read at the
    # compute the cheapest run spent in all: its final loss against their loss when they had spent as much.
    budget = min((r.loss_at_compute()[-1][0] for rs in groups.values() for r in rs if r.loss_at_compute()),
                 default=0.0)
    extra_compute = any(r.extra_compute() for rs in groups.values() for r in rs)
    # Gradient transforms' own columns (`TransformEntry.columns`), where a run logged them.
    transform_columns = [c for _, entry in GRADIENT_TRANSFORMS.items() for c in entry.columns
                         if any(r.curves.get(c.tag) for rs in groups.values() for r in rs)]
    compute_header = [f"train loss at {budget:g} steps' compute"] if extra_compute else []
    headers = ["run", "seeds", "final top-1", "best top-1", *(c[0] for c in columns), "final train loss",
               *compute_header, "images/s", "train time (s)", "optimizer state per rank (MiB)",
               *(c.header for c in transform_columns)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for label, members in groups.items():
        lines.append(" | ".join([
            f"| {label}", str(len(members)),
            _mean_spread([r.final("val/top1") * 100 for r in members], ".2f"),
            _mean_spread([r.best("val/top1") * 100 for r in members], ".2f"),
            *(_mean_spread([r.final(tag) * scale for r in members], fmt) for _, tag, scale, fmt in columns),
            _mean_spread([r.final("train/loss") for r in members], ".4f"),
            *([_mean_spread([_loss_within(r, budget) for r in members], ".4f")] if extra_compute else []),
            _mean_spread([r.mean_after_first("train/images_per_s") for r in members], ".0f"),
            _mean_spread([r.wall_s for r in members], ".0f"),
            _mean_spread([r.final("optimizer/state_mib_per_rank") for r in members], ".3f"),
            *(_mean_spread([r.final(c.tag) * c.scale for r in members], c.format) for c in transform_columns)]) + " |")
    lines.append("")
    lines += _throughput_ratios(groups)
    lines.append("")
    lines += [f"![{name}]({name}.png)" for name in _plot(groups, out)]
    markdown = "\n".join(lines) + "\n"
    (out / "report.md").write_text(markdown)
    return markdown


def _loss_within(run: Run, budget: float) -> float:
    """The train loss logged last before the run's compute passed `budget`."""
    within = [loss for compute, loss in run.loss_at_compute() if compute <= budget]
    return within[-1] if within else float("nan")


def _throughput_ratios(groups: dict[str, list[Run]]) -> list[str]:
    """Each optimizer's images/s relative to AdamW on the same workload: the same setting
    apart from the optimizer's section and the recipe's description."""
    def workload(run: Run) -> dict:
        return {k: v for k, v in run.setting.items() if not k.startswith(("optim.", "recipe."))}

    lines = []
    for label, members in groups.items():
        name = members[0].setting["optim.name"]
        if name == "adamw":
            continue
        peers = [m for ms in groups.values() for m in ms
                 if m.setting["optim.name"] == "adamw" and workload(m) == workload(members[0])]
        if peers:
            context = re.sub(r", lr [^,]*", "", label.split("(", 1)[1][:-1])
            mine = statistics.fmean(r.mean_after_first("train/images_per_s") for r in members)
            adamw = statistics.fmean(r.mean_after_first("train/images_per_s") for r in peers)
            shown = label.split(" (", 1)[0]  # the optimizer, with its gradient transform if any
            lines.append(f"{shown.replace(name, name.upper(), 1)} throughput relative to "
                         f"{shown.replace(name, 'AdamW', 1)} ({context}): {mine / adamw:.3f}")
    return lines


BAND = "band: min-max over seeds"
"""What the shaded band around each mean curve shows (said in every plot's title)."""
LINESTYLES = ("-", "--", ":", "-.")
PLOTS = (("train/loss", "train loss", 1, "train loss"), ("val/top1", "val top-1", 100, "val top-1 (%)"),
         ("train/images_per_s", "throughput", 1, "images/s"))
"""(tag, title, scale, y label) of the curves compared: percentages on a 0-100 scale, as in the table."""


def _styles(groups: dict[str, list[Run]]) -> dict[str, tuple[str, str]]:
    """Row label -> (colour, line style): one colour per optimizer (with its gradient
    transform), a line style per setting of that optimizer (e.g. each LR)."""
    colours: dict[str, str] = {}
    used: dict[str, int] = {}
    styles = {}
    for label in groups:
        optimizer = label.split(" (", 1)[0]
        colours.setdefault(optimizer, f"C{len(colours)}")
        styles[label] = colours[optimizer], LINESTYLES[used.get(optimizer, 0) % len(LINESTYLES)]
        used[optimizer] = used.get(optimizer, 0) + 1
    return styles


def _mean_band(ax, curves: list[list[tuple[float, float]]], scale: float, colour: str, style: str,
               label: str) -> None:
    """The mean over seeds at each logged step (of the seeds that logged it), with a min-max
    band; markers on curves of few points, so a short run still shows where it was measured."""
    curves = [dict(c) for c in curves if c]
    if not curves:
        return
    steps = sorted(set().union(*curves))
    values = [[c[s] * scale for c in curves if s in c] for s in steps]
    mean = [statistics.fmean(v) for v in values]
    seeds = f", mean of {len(curves)} seeds" if len(curves) > 1 else ""
    ax.plot(steps, mean, color=colour, linestyle=style, marker="o" if len(steps) < 30 else None, markersize=4,
            label=label + seeds)
    if len(curves) > 1:
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=colour, alpha=0.2,
                        linewidth=0)


def _plot(groups: dict[str, list[Run]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = _styles(groups)
    names = []
    for tag, title, scale, ylabel in PLOTS:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, members in groups.items():
            _mean_band(ax, [run.curves.get(tag, []) for run in members], scale, *styles[label], label)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} ({BAND})")
        name = tag.replace("/", "_")
        _save(fig, ax, out / f"{name}.png")
        names.append(name)
    if any(r.extra_compute() for rs in groups.values() for r in rs):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, members in groups.items():
            _mean_band(ax, [run.loss_at_compute() for run in members], 1, *styles[label], label)
        ax.set_xlabel("compute (steps' worth of forward/backward passes)")
        ax.set_ylabel("train loss")
        ax.set_title(f"train loss at equal compute ({BAND})")
        _save(fig, ax, out / "train_loss_equal_compute.png")
        names.append("train_loss_equal_compute")
    return names


# --- the tuned comparison: each optimizer's point chosen on minival, reported on val ---------
MINIVAL_SCALARS = ("minival/top1", "minival/nll")
SELECT_TAG, REPORT_TAG = "minival/top1", "val/top1"


@dataclass
class Selected:
    """One optimizer's point chosen on minival, and every point it was chosen from."""
    optimizer: str
    point: str
    """The chosen values of the keys its points differ in, e.g. "lr=0.01"."""
    runs: list[Run]
    """The chosen point's seeds."""
    points: dict[str, list[Run]]
    """Every point of this optimizer: name -> its seeds."""


def select_on_minival(groups: dict[str, list[Run]]) -> dict[str, Selected]:
    """Per optimizer, the point (a group of seeds) with the best mean final minival top-1.
    Reads SELECT_TAG only: the val set never decides, so its numbers at the chosen point are
    an unbiased report. A tie goes to the first point in run-folder order."""
    by_optimizer: dict[str, list[list[Run]]] = {}
    for members in groups.values():
        by_optimizer.setdefault(members[0].setting["optim.name"], []).append(members)
    selected = {}
    for name, points in by_optimizer.items():
        untuned = [str(r.path) for members in points for r in members if not r.curves.get(SELECT_TAG)]
        if untuned:
            raise ValueError(f"{', '.join(untuned)}: no {SELECT_TAG} logged; train with data.minival=N "
                             f"(a tuning split held out of train) to select on it")
        first = points[0][0].setting
        varying = sorted({k for m in points for k in m[0].setting.keys() | first.keys()
                          if m[0].setting.get(k) != first.get(k)})
        named = {",".join(f"{k.rsplit('.', 1)[-1]}={m[0].setting.get(k)}" for k in varying) or "one point": m
                 for m in points}
        best = max(named, key=lambda point: statistics.fmean(r.final(SELECT_TAG) for r in named[point]))
        selected[name] = Selected(name, best, named[best], named)
    return selected


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, sample std, half-width of the Student-t interval of the mean); nan spread for one value."""
    from scipy.stats import t

    mean, n = statistics.fmean(values), len(values)
    if n < 2:
        return mean, float("nan"), float("nan")
    std = statistics.stdev(values)
    return mean, std, t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)


def paired_difference(runs: list[Run], baseline: list[Run], tag: str = REPORT_TAG) -> tuple[float, float, list[int]]:
    """(mean, 95% half-width, seeds) of run - baseline over the seeds both have: pairing by
    seed removes what a seed does to both (initialization, data order)."""
    mine, theirs = ({r.seed: r.final(tag) for r in rs} for rs in (runs, baseline))
    seeds = sorted(mine.keys() & theirs.keys())
    if not seeds:
        return float("nan"), float("nan"), []
    mean, _, half = t_interval([mine[s] - theirs[s] for s in seeds])
    return mean, half, seeds


def tuned_comparison(paths: list[str], out: str | Path, baseline: str = "adamw") -> str:
    """The Markdown section choosing each optimizer's point on minival and reporting val there
    (mean, std, 95% interval over seeds, paired difference to `baseline`), with its PNGs
    written to `out`; "" when no run logged minival metrics."""
    groups = group_runs([load_run(p) for p in find_runs(paths)])
    if not any(r.curves.get(SELECT_TAG) for members in groups.values() for r in members):
        return ""
    selected = select_on_minival(groups)
    base = selected.get(baseline)
    lines = ["## Tuned on minival, reported on val", "",
             f"Per optimizer, the point with the best mean final minival top-1 over its seeds; val is "
             f"read only at that point. {_split_sizes(next(iter(selected.values())).runs[0])}", "",
             f"| optimizer | selected on minival (of {max(len(s.points) for s in selected.values())}) | seeds | "
             f"minival top-1 | val top-1 | 95% interval | val top-1 - {baseline} (paired seeds) | 95% interval |",
             "|" + "---|" * 8]
    for name, sel in selected.items():
        mean, _, half = t_interval([r.final(REPORT_TAG) * 100 for r in sel.runs])
        diff = "n/a", "n/a"
        if base is not None and name != baseline:
            d, d_half, seeds = paired_difference(sel.runs, base.runs)
            diff = f"{d * 100:+.2f} ({len(seeds)} seeds)", _interval(d * 100, d_half * 100, "+.2f")
        lines.append(f"| {name} | {sel.point}{' (edge of the grid)' if _at_edge(sel) else ''} | {len(sel.runs)} | "
                     f"{_mean_spread([r.final(SELECT_TAG) * 100 for r in sel.runs], '.2f')} | "
                     f"{_mean_spread([r.final(REPORT_TAG) * 100 for r in sel.runs], '.2f')} | "
                     f"{_interval(mean, half, '.2f')} | {diff[0]} | {diff[1]} |")
    lines += ["", *(f"![{name}]({name}.png)" for name in _plot_tuned(selected, Path(out)))]
    return "\n".join(lines) + "\n"


def _at_edge(sel: Selected) -> bool:
    """Whether the chosen LR is the smallest or largest of 3+ swept: the best may lie outside."""
    lrs = {ms[0].setting["optim.lr"] for ms in sel.points.values()}
    return len(lrs) > 2 and sel.runs[0].setting["optim.lr"] in (min(lrs), max(lrs))


def _interval(mean: float, half: float, fmt: str) -> str:
    return "n/a (one seed)" if half != half else f"[{format(mean - half, fmt)}, {format(mean + half, fmt)}]"


def _split_sizes(run: Run) -> str:
    """The val and minival sizes, and what one val image is worth in top-1 points."""
    from vsgd_dist.data.demo import default_cache_dir
    from vsgd_dist.data.manifest import read_manifest

    manifest = read_manifest(run.setting.get("data.data_dir") or default_cache_dir())
    if manifest is None:
        return "Val size unknown (no manifest.json)."
    val = manifest.counts["val"]
    return (f"Val: {val} images (one image is {100 / val:.2f} points of top-1); minival: "
            f"{run.setting['data.minival']} images held out of train (seed {run.setting['data.minival_seed']}).")


def _plot_tuned(selected: dict[str, Selected], out: Path) -> list[str]:
    """lr_sensitivity: minival and val top-1 against the LR, mean and std over seeds, the other
    swept keys at the selected point's values; train_loss_selected: the selected points' curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    all_lrs = set()
    for i, sel in enumerate(selected.values()):
        chosen = {k: v for k, v in sel.runs[0].setting.items() if k != "optim.lr"}
        points = sorted((ms for ms in sel.points.values()
                         if {k: v for k, v in ms[0].setting.items() if k != "optim.lr"} == chosen),
                        key=lambda ms: ms[0].setting["optim.lr"])
        lrs = [ms[0].setting["optim.lr"] for ms in points]
        all_lrs.update(lrs)
        for tag, style, split in ((SELECT_TAG, "--", "minival"), (REPORT_TAG, "-", "val")):
            values = [[r.final(tag) * 100 for r in ms] for ms in points]
            ax.errorbar(lrs, [statistics.fmean(v) for v in values],
                        yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in values],
                        color=f"C{i}", linestyle=style, marker="o", capsize=3, label=f"{sel.optimizer} {split}")
        ax.plot([sel.runs[0].setting["optim.lr"]], [statistics.fmean(r.final(REPORT_TAG) * 100 for r in sel.runs)],
                marker="*", markersize=14, color=f"C{i}", linestyle="none")
    ax.set_xscale("log")
    ax.set_xticks(sorted(all_lrs), [f"{lr:g}" for lr in sorted(all_lrs)])
    ax.minorticks_off()
    ax.set_xlabel("peak LR (optim.lr)")
    ax.set_ylabel("top-1 (%), mean ± std over seeds")
    ax.set_title("LR sensitivity (star: selected on minival)")
    _save(fig, ax, out / "lr_sensitivity.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, sel in enumerate(selected.values()):
        _mean_band(ax, [run.curves.get("train/loss", []) for run in sel.runs], 1, f"C{i}", "-",
                   f"{sel.optimizer} {sel.point}")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title(f"train loss at the selected points ({BAND})")
    _save(fig, ax, out / "train_loss_selected.png")
    return ["lr_sensitivity", "train_loss_selected"]
