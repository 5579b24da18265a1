"""Typed run configuration: recipes (YAML) + `key=value` overrides -> `RunConfig`.

A recipe is data: it selects components (model, optimizer, engine, data) and sets numbers.
OmegaConf merges the YAML and the overrides onto the dataclass schema, so unknown keys and
wrong types fail before any process starts; `check()` then validates the values together.
Overrides may use the full dotted path (`optim.lr=0.1`), a short alias (`optimizer=vsgd`,
`engine=zero`) or any field name that is unique across sections (`max_steps=50`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vsgd_dist.data.config import DataConfig
from vsgd_dist.engines.registry import ENGINES, SHARD_WITHIN, SHARD_WITHIN_NODE
from vsgd_dist.models import MODELS
from vsgd_dist.optim import OPTIMIZERS
from vsgd_dist.registry import import_plugins, suggest
from vsgd_dist.key_hints import key_hint
from vsgd_dist.train.schedule import SCHEDULES
from vsgd_dist.transforms import GRADIENT_TRANSFORMS

PRECISIONS = ("fp32", "bf16")
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
"""The recipes tree: a recipe's `base:` file lives here or next to the recipe."""


class ConfigError(ValueError):
    """A recipe or override that cannot run; the message names the key and the fix."""


@dataclass
class ModelConfig:
    name: str = "resnet_tiny"
    """Architecture, a name in `vsgd_dist.models.MODELS`: resnet_tiny (demo), resnet18,
    resnet50, vit_s16, vit_b16."""
    channels_last: bool = True
    """Run convolutions in NHWC memory format (faster on tensor cores and oneDNN)."""
    compile: bool = False
    """Wrap the model in torch.compile (first steps pay the compilation)."""
    blurpool: bool = False
    """Blur ([1,2,1] x [1,2,1] / 16) before every strided convolution with >= 16 input channels,
    as ffcv-imagenet's ResNets do (`vsgd_dist.models.blurpool`); no effect on ViTs."""
    drop_path: float = 0.0
    """Stochastic depth of the ViTs: each block's attention and MLP branch dropped per sample
    at rates rising over the blocks from 0 to this (DeiT-S/B: 0.1), draws keyed by train.seed
    and the micro-batch (`vsgd_dist.models.drop_path`); 0: off."""


@dataclass
class OptimSettings:
    """The settings every optimizer shares; `OptimConfig` adds one section per registered
    optimizer (`optim.vsgd`, `optim.adamw`, ...) with its own hyperparameters."""

    name: str = "vsgd"
    """Optimizer, a name in `vsgd_dist.optim.OPTIMIZERS` (vsgd, adamw, ...)."""
    lr: float = 0.1
    """Peak learning rate at `lr_base_batch` images per step (scaled linearly to global_batch)."""
    lr_base_batch: int = 0
    """Linear scaling rule: lr_used = lr * global_batch / lr_base_batch; 0 turns scaling off."""
    weight_decay: float = 0.0
    """Weight decay, as the optimizer applies it (decoupled for AdamW and VSGD, L2 for SGD)."""
    wd_exclude_1d: bool = True
    """No weight decay on 1-D parameters (norm weights and biases), as ffcv-imagenet, DeiT and
    torchvision's recipes do; false: every parameter decays (torch's default)."""
    fused: bool | None = None
    """One pass over memory per step. Default (null): on for VSGD (its C++ kernel on CPU,
    Triton on CUDA; where it cannot be built, the unfused path after one warning) and AdamW
    (torch's fused implementation), off for optimizers whose fused path compiles per process
    (`OptimizerEntry.fused_by_default`); true/false: for any optimizer."""

    @property
    def hparams(self):
        """The selected optimizer's own section."""
        return getattr(self, self.name)


import_plugins()  # before the optimizer sections below are made from the registry
OptimConfig = make_dataclass(
    "OptimConfig", [(name, entry.hparams, field(default_factory=entry.hparams)) for name, entry in OPTIMIZERS.items()],
    bases=(OptimSettings,))
OptimConfig.__module__ = __name__  # pickles by name like the other sections
OptimConfig.__doc__ = "Shared optimizer settings plus one section of hyperparameters per registered optimizer."


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    """LR shape after warmup, a name in `vsgd_dist.train.schedule.SCHEDULES` (cosine, linear,
    step, constant); stepped every iteration. linear after a linear warmup is ffcv-imagenet's
    triangular schedule."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many steps."""
    warmup_epochs: float = 0.0
    """Warmup in epochs (converted with the steps per epoch); adds to warmup_steps."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine and linear shapes as a fraction of the peak LR."""
    step_epochs: list[int] = field(default_factory=lambda: [30, 60, 80])
    """Step schedule: epochs at which the LR is multiplied by step_gamma."""
    step_gamma: float = 0.1
    """Step schedule: the factor."""


@dataclass
class EngineConfig:
    name: str = "zero"
    """How the work is distributed, a name in `vsgd_dist.engines.ENGINES`: ddp (replicated
    optimizer), zero (native ZeroOptimizer), fsdp2 (fully_shard, DTensor parameters) or
    deepspeed (ZeRO via deepspeed.initialize)."""
    zero_stage: int = 2
    """ZeRO stage for zero and deepspeed: 1 (shard optimizer state) or 2 (also gradients)."""
    bucket_mb: float = 25.0
    """Communication bucket size in MiB."""
    shard_within: str = "world"
    """Over which ranks zero and fsdp2 shard the optimizer state (and fsdp2 the parameters):
    world (each of the N ranks holds 1/N) or node (each rank holds 1/(ranks per node), every
    node holds a whole copy; gradients are reduce-scattered inside the node and the shards
    all-reduced across nodes, and fsdp2 runs as HSDP on a (replicate, shard) mesh). Ranks per
    node come from the launcher (LOCAL_WORLD_SIZE, SLURM's tasks per node) and must be the
    same on every node."""
    prefetch_params: bool = False
    """zero only: leave the all-gather of the updated parameters running after a step, and
    wait for each bucket's in the forward pre-hook of every module that holds its parameters,
    so communication overlaps the next forward. Until then the parameters hold the old
    weights for anyone who reads them through their own reference to the model (the engine's
    `model` and `mean_weights()` wait; the trainer reads them only through those), hence off by
    default and on in the recipes. Off with model.compile (hooks inside a compiled graph);
    refused for a parameter registered in several modules (tied weights)."""


@dataclass
class TrainConfig:
    global_batch: int = 256
    """Images per optimizer step over all ranks; each rank reads global_batch / (world_size *
    accum_steps) per micro-batch."""
    accum_steps: int = 1
    """Gradient accumulation: micro-batches per optimizer step (gradients synchronized on the
    last only, losses scaled by 1 / accum_steps), so a recipe's global batch runs on fewer GPUs."""
    epochs: int = 10
    """Epochs to train (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (>0 overrides epochs; the LR schedule spans it)."""
    stop_at: int = 0
    """End the run after this step with a checkpoint, as a preemption would (0: off)."""
    precision: str = "fp32"
    """fp32, or bf16 autocast (CPU and CUDA); master weights and optimizer state stay fp32.
    With engine fsdp2, bf16 also all-gathers the parameters in bf16 (gradients reduced in fp32)."""
    fast_kernels: bool = True
    """CUDA only: cudnn.benchmark (autotuned convolutions) and TF32 for fp32 matmuls and
    convolutions. false: neither, and deterministic algorithms, so a run repeats and resumes
    bit for bit on the same GPU type (slower)."""
    label_smoothing: float = 0.1
    """Cross-entropy label smoothing."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value (0: off; the norm is logged either way)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights with this decay (0: off)."""
    seed: int = 0
    """Seed for model init, data order and augmentation."""
    log_every: int = 10
    """Steps between scalar logs; a run shorter than 8 x log_every logs 8 times (at least every
    total_steps // 8 steps), so that its curves have points."""
    diag_every: int = 50
    """Steps between VSGD diagnostics (scalars and histograms per layer group)."""
    val_every_epochs: int = 1
    """Validate every this many epochs (a run always ends with a validation pass)."""
    val_flip: bool = False
    """Test-time flip: validation averages the logits of each image and its mirror image."""
    val_mc_samples: int = 10
    """Optimizers that train at weight samples (IVON): validation also reports the posterior
    predictive, the average of the softmax over this many weight samples (0: off)."""
    stop_check_every: int = 10
    """Steps between checks whether any rank was asked to stop (preemption, SIGTERM): each
    check is one small collective."""
    hang_timeout_s: float = 300.0
    """`launch run` ends a run in which no rank completes a step for this many seconds, naming
    the stalled rank (0: never); keep it above the longest validation or checkpoint pause."""
    ckpt_every: int = 0
    """Steps between periodic checkpoints (0: only at the end and on preemption)."""
    keep_checkpoints: int = 2
    """Keep this many latest checkpoints."""
    async_checkpoint: bool = False
    """Write periodic checkpoints in the background (`dcp.async_save` from a host copy of the
    state): training goes on while the files are written, at the cost of that copy in host
    memory. The next save, the end of the run and a preemption wait for it; a checkpoint is
    published only once every rank has written it, so a failed background write is reported
    and the previous checkpoint stays the resume point."""
    out: str = "runs/default"
    """Run folder: TensorBoard events, checkpoints, resolved recipe."""
    progress: bool = True
    """Show a tqdm progress bar on rank 0."""


@dataclass
class RecipeInfo:
    description: str = ""
    """What the recipe trains and why these numbers."""
    gpus: int = 0
    """GPU count the recipe was designed for (global_batch is what must be kept)."""
    target_top1: float = 0.0
    """Top-1 accuracy this recipe aims at, from the cited public run."""
    reference: str = ""
    """Where the target comes from."""


@dataclass
class RunSettings:
    """The sections every run has; `RunConfig` adds one section per registered gradient
    transform, made from its `TransformEntry.config`."""

    recipe: RecipeInfo = field(default_factory=RecipeInfo)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def check(self, world_size: int | None = None) -> None:
        """Raise ConfigError for values that cannot work together."""
        choices = [("model.name", self.model.name, MODELS), ("optim.name", self.optim.name, OPTIMIZERS),
                   ("engine.name", self.engine.name, ENGINES), ("schedule.name", self.schedule.name, SCHEDULES),
                   ("train.precision", self.train.precision, PRECISIONS)]
        for key, value, allowed in choices:
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}{suggest(value, allowed)}")
        self._check_optimizer()
        self._check_resolutions()
        if not 0.0 <= self.model.drop_path < 1.0:
            raise ConfigError(f"model.drop_path={self.model.drop_path} must be in [0, 1) (0: off; DeiT-S/B: 0.1)")
        if self.model.drop_path and not MODELS.get(self.model.name).drop_path:
            raise ConfigError(f"model.drop_path={self.model.drop_path}: model {self.model.name} has no stochastic "
                              f"depth (the ViTs have); set model.drop_path=0")
        self._check_transforms()
        if self.engine.name == "deepspeed" and self.model.channels_last:
            raise ConfigError("engine.name=deepspeed needs model.channels_last=false: DeepSpeed broadcasts the "
                              "parameters as bytes, which needs contiguous ones (the loaders deliver channels_last "
                              "images either way, so convolutions still run NHWC)")
        if self.engine.shard_within not in SHARD_WITHIN:
            raise ConfigError(f"engine.shard_within={self.engine.shard_within!r} is not one of {', '.join(SHARD_WITHIN)}"
                              f"{suggest(self.engine.shard_within, SHARD_WITHIN)}")
        if self.engine.shard_within == "node" and self.engine.name not in SHARD_WITHIN_NODE:
            raise ConfigError(f"engine.shard_within=node needs engine.name={' or '.join(SHARD_WITHIN_NODE)}; "
                              f"{self.engine.name} shards over the world or not at all: use engine.shard_within=world")
        if self.engine.zero_stage not in (1, 2):
            raise ConfigError(f"engine.zero_stage={self.engine.zero_stage} must be 1 or 2")
        tc = self.train
        if tc.global_batch < 1:
            raise ConfigError(f"train.global_batch={tc.global_batch} must be at least 1")
        if tc.accum_steps < 1:
            raise ConfigError(f"train.accum_steps={tc.accum_steps} must be at least 1")
        if world_size is not None and tc.global_batch % (world_size * tc.accum_steps):
            raise ConfigError(f"train.global_batch={tc.global_batch} is not divisible by the world size "
                              f"{world_size} x train.accum_steps={tc.accum_steps}; use a multiple of "
                              f"{world_size * tc.accum_steps} or another process count")
        if tc.precision == "fp32" and self.data.dtype != "fp32":
            raise ConfigError(f"train.precision=fp32 runs the model in fp32 but data.dtype={self.data.dtype} "
                              f"delivers {self.data.dtype} images; add data.dtype=fp32")
        if tc.max_steps < 0 or tc.epochs < 1 and tc.max_steps == 0:
            raise ConfigError("set train.max_steps > 0 or train.epochs >= 1")
        if tc.stop_at < 0 or (tc.max_steps and tc.stop_at > tc.max_steps):
            raise ConfigError(f"train.stop_at={tc.stop_at} must be in [0, max_steps={tc.max_steps}]")
        if tc.seed < 0:
            raise ConfigError(f"train.seed={tc.seed} must be >= 0")
        if not (self.optim.lr >= 0 and math.isfinite(self.optim.lr)):
            raise ConfigError(f"optim.lr={self.optim.lr} must be a finite number >= 0")
        if not tc.hang_timeout_s >= 0:
            raise ConfigError(f"train.hang_timeout_s={tc.hang_timeout_s} must be >= 0 (0 turns the watchdog off)")
        if not 0.0 <= tc.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay={tc.ema_decay} must be in [0, 1)")
        if not 0.0 <= tc.label_smoothing < 1.0:
            raise ConfigError(f"train.label_smoothing={tc.label_smoothing} must be in [0, 1)")
        for name in ("log_every", "diag_every", "val_every_epochs", "keep_checkpoints", "stop_check_every"):
            if getattr(tc, name) < 1:
                raise ConfigError(f"train.{name}={getattr(tc, name)} must be at least 1")
        if tc.val_mc_samples < 0:
            raise ConfigError(f"train.val_mc_samples={tc.val_mc_samples} must be >= 0")
        self.data.check()

    def _check_optimizer(self) -> None:
        """The optimizer's own range checks, run here so a bad value fails in the launcher."""
        o = self.optim
        entry = OPTIMIZERS.get(o.name)
        if entry.engines and self.engine.name not in entry.engines:
            raise ConfigError(f"optimizer {o.name} runs on the engines {', '.join(entry.engines)}, not "
                              f"engine.name={self.engine.name}; pick one of those")
        try:
            entry.validate(o.hparams, o.lr, o.weight_decay)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"optim.{o.name}: {e}") from None

    def _check_transforms(self) -> None:
        """Each registered gradient transform's own checks of its section."""
        for name, entry in GRADIENT_TRANSFORMS.items():
            try:
                entry.check(getattr(self, name), self)
            except ValueError as e:
                raise ConfigError(str(e)) from None

    def _check_resolutions(self) -> None:
        d = self.data
        if MODELS.get(self.model.name).fixed_resolution and len({d.start_res, d.end_res, d.val_res}) > 1:
            raise ConfigError(f"model {self.model.name} takes {d.end_res} px images only (its position "
                              f"embeddings are fixed), but data.start_res={d.start_res}, data.val_res="
                              f"{d.val_res}: set both to data.end_res")

    def to_dict(self) -> dict:
        return asdict(self)


RunConfig = make_dataclass(
    "RunConfig", [(name, entry.config, field(default_factory=entry.config))
                  for name, entry in GRADIENT_TRANSFORMS.items()], bases=(RunSettings,))
RunConfig.__module__ = __name__  # pickles by name like the other sections
RunConfig.__doc__ = ("A whole run: the sections of `RunSettings` plus one per registered gradient transform "
                     "(`vsgd_dist.transforms`; each is off by its own default).")


# Short override names that read better than their paths.
ALIASES = {"optimizer": "optim.name", "engine": "engine.name", "model": "model.name",
           "lr": "optim.lr", "seed": "train.seed"}


def _leaf_paths(cls=RunConfig, prefix: str = "") -> list[str]:
    paths = []
    for f in fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            paths += _leaf_paths(type(default), f"{prefix}{f.name}.")
        else:
            paths.append(prefix + f.name)
    return paths


def resolve_key(key: str) -> str:
    """Full dotted path for an override key (alias, unique leaf name, or the path itself)."""
    paths = _leaf_paths()
    if key in ALIASES:
        return ALIASES[key]
    if key in paths:
        return key
    matches = [p for p in paths if p.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"override key {key!r} is ambiguous ({', '.join(matches)}); use the full path")
    section = key.rpartition(".")[0]
    candidates = [p for p in paths if p.startswith(section + ".")] if section else paths + list(ALIASES)
    listing = None if section else [f"the sections {', '.join(f.name for f in fields(RunConfig))} (e.g. "
                                    f"train.global_batch)", f"the short names {', '.join(ALIASES)}"]
    raise ConfigError(f"unknown recipe key {key!r}{key_hint(key, candidates or paths, listing)}")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`key=value` strings -> {dotted path: value}, values typed as YAML scalars."""
    parsed = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (example: optimizer=vsgd)")
        try:
            parsed[resolve_key(key.strip())] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)}); "
                              f"quote it, e.g. {key}='\"{raw}\"'") from None
    return parsed


def _nest(flat: dict[str, Any]) -> dict:
    nested: dict = {}
    for path, value in flat.items():
        node = nested
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def load_recipe(path: str | Path, overrides: list[str] = (), world_size: int | None = None) -> RunConfig:
    """Read a recipe file, apply overrides, type-check and validate; raise ConfigError."""
    return build_config(read_recipe_file(Path(path)), overrides, world_size, source=str(path))


def read_recipe_file(path: Path, seen: tuple = ()) -> dict:
    """A recipe's sections, with `base: other.yaml` (relative to the file, in the recipes tree
    or next to it) merged under them, so per-optimizer recipes share one file of model and
    data settings. Errors name the file, never its content."""
    if path.is_dir():
        raise ConfigError(f"recipe {str(path)!r} is a folder; give a YAML file (e.g. recipes/demo.yaml)")
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist; recipes live in recipes/ (e.g. recipes/demo.yaml)")
    if path.resolve() in seen:
        raise ConfigError(f"recipe {path} includes itself through 'base:'")
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {path} is not a text file; give a YAML recipe (e.g. recipes/demo.yaml)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {_yaml_problem(e)}") from None
    if data is None:
        raise ConfigError(f"recipe {path} is empty; start from a copy of recipes/demo.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections (model:, optim:, ...)")
    base = data.pop("base", None)
    if base is None:
        return data
    return _deep_merge(read_recipe_file(_base_path(path, base), seen + (path.resolve(),)), data)


def _base_path(recipe: Path, base) -> Path:
    """The file `base:` names: only in the recipes tree or in the including recipe's folder."""
    path = (recipe.parent / str(base)).resolve()
    if path.parent != recipe.resolve().parent and not path.is_relative_to(RECIPES_DIR):
        raise ConfigError(f"recipe {recipe}: base {str(base)!r} is neither in {RECIPES_DIR} nor next to the "
                          f"recipe; put the shared settings in one of those folders")
    return path


def _yaml_problem(e: yaml.YAMLError) -> str:
    """What is wrong and where, without quoting the text."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(e, 'problem', None) or type(e).__name__}{where}"


def _deep_merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else value
    return merged


def build_config(data: dict, overrides: list[str] = (), world_size: int | None = None,
                 source: str = "recipe") -> RunConfig:
    _check_keys(data, RunConfig, "", source)
    schema = OmegaConf.structured(RunConfig)
    try:
        merged = OmegaConf.merge(schema, data, _nest(parse_overrides(list(overrides))))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{source}: bad value for {key}: {msg}") from None
    except ValueError as e:  # a section's own __post_init__ check (e.g. DataConfig)
        raise ConfigError(f"{source}: {e}") from None
    cfg.check(world_size)
    return cfg


def _check_keys(data: dict, cls, prefix: str, source: str) -> None:
    """Unknown keys anywhere in the recipe, with the closest valid key suggested."""
    known = {f.name: f for f in fields(cls)}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key {prefix + str(key)!r}"
                              f"{key_hint(prefix + str(key), [prefix + k for k in known])}")
        default = known[key].default_factory() if callable(known[key].default_factory) else None
        if is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {prefix + key} must be a section (mapping), got {value!r}")
            _check_keys(value, type(default), f"{prefix}{key}.", source)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(data: dict) -> RunConfig:
    """The inverse of `to_dict` (resolved recipes saved in run folders)."""
    return build_config(data, source="saved recipe")
