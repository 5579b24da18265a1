"""The ImageNet recipes' building blocks (SGD, the linear schedule, weight-decay groups,
gradient accumulation on every engine, BlurPool, config checks) and every recipe in
recipes/imagenet/ run end to end through `launch run` on a small ImageNet-shaped FFCV set."""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch.__main__ import main as launch
from test_data import write_cli
from vsgd_dist.config import ConfigError, RunConfig, ScheduleConfig, load_recipe
from vsgd_dist.models import build_model
from vsgd_dist.models.blurpool import BlurPoolConv2d
from vsgd_dist.optim import named_param_groups
from vsgd_dist.spawn import run_distributed
from vsgd_dist.train.engine_setup import engine_for
from vsgd_dist.train.schedule import lr_lambda

RECIPES = sorted(Path("recipes/imagenet").glob("[!_]*.yaml"))


# ------------------------------------------------------------------- small pieces
def test_linear_schedule_is_ffcv_imagenets_triangle():
    """Warmup to the peak at epoch 2, then straight down to 0 at the last step."""
    multiplier = lr_lambda(ScheduleConfig(name="linear", warmup_epochs=2), total_steps=160, steps_per_epoch=10)
    assert multiplier(19) == 1.0 and multiplier(0) == pytest.approx(1 / 20)
    assert multiplier(20 + 70) == pytest.approx(0.5) and multiplier(160) == 0.0


def test_weight_decay_exclusion_of_1d_parameters_is_a_switch():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    on, off = named_param_groups(model, 0.1), named_param_groups(model, 0.1, exclude_1d=False)
    assert [(g["param_names"], g["weight_decay"]) for g in on] == [(["0.weight"], 0.1),
                                                                    (["0.bias", "1.weight", "1.bias"], 0.0)]
    assert [(g["param_names"], g["weight_decay"]) for g in off] == [(["0.weight", "0.bias", "1.weight", "1.bias"],
                                                                     0.1)]


def test_blurpool_wraps_ffcv_imagenets_convolutions_of_resnet50():
    """The strided convolutions with >= 16 input channels (3 bottleneck conv2 and 3 downsample
    convs); the 3-channel stem stays; no parameter is added."""
    plain, blurred = build_model("resnet50", 10), build_model("resnet50", 10, blurpool=True)
    wrapped = [name for name, m in blurred.named_modules() if isinstance(m, BlurPoolConv2d)]
    assert wrapped == [f"layer{i}.0.{c}" for i in (2, 3, 4) for c in ("conv2", "downsample.0")]
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in blurred.parameters())
    blur = blurred.layer2[0].conv2
    flat = torch.ones(1, blur.conv.in_channels, 6, 6)
    assert torch.equal(torch.nn.functional.conv2d(flat, blur.blur_filter, padding=1,
                                                  groups=blur.conv.in_channels)[..., 1:-1, 1:-1],
                       flat[..., 1:-1, 1:-1])  # a normalized blur: constant stays constant


@pytest.mark.parametrize("overrides,message", [
    (["precision=fp32"], "train.precision=fp32 runs the model in fp32 but data.dtype=bf16 delivers bf16 "
                         "images; add data.dtype=fp32"),
    (["train.accum_steps=3"], "not divisible by the world size 8 x train.accum_steps=3"),
    (["data.val_res=256"], "set both to data.end_res"),
])
def test_recipe_combinations_that_cannot_run_are_refused_before_any_process(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_recipe("recipes/imagenet/vit_s16_vsgd.yaml", overrides, world_size=8)


# ------------------------------------------------------------ gradient accumulation
ACCUM_ENGINES = [("ddp", 2), ("zero", 1), ("zero", 2), ("fsdp2", 2), ("deepspeed", 2)]
STEPS, BATCH, ACCUM = 4, 12, 3


def accumulation_model() -> torch.nn.Module:
    """No BatchNorm: a micro-batch's output does not depend on the others in its batch."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(13, 7), torch.nn.LayerNorm(7), torch.nn.GELU(), torch.nn.Linear(7, 3))


def accumulation_engine(name, stage, accum, exclude_1d):
    cfg = RunConfig()
    cfg.optim.name, cfg.optim.weight_decay, cfg.optim.wd_exclude_1d = "sgd", 0.1, exclude_1d
    cfg.engine.name, cfg.engine.zero_stage, cfg.engine.bucket_mb = name, stage, 64 / 2**20  # several buckets
    cfg.train.global_batch, cfg.train.accum_steps = BATCH, accum
    return engine_for(accumulation_model(), cfg, 0.1)


def full_of(param):
    return (param.full_tensor() if hasattr(param, "full_tensor") else param).detach().clone()


def check_accumulation(rank, world):
    """For each engine: k micro-batches per step (all but the last under no_sync, losses / k)
    against one batch of k times the size, and both against one unsharded process."""
    loss_of = torch.nn.functional.mse_loss
    results = {}
    for name, stage in ACCUM_ENGINES:
        for exclude_1d in (True, False):
            reference = accumulation_model()
            ref_opt = torch.optim.SGD(named_param_groups(reference, 0.1, exclude_1d), lr=0.1, momentum=0.9)
            runs = {accum: accumulation_engine(name, stage, accum, exclude_1d) for accum in (1, ACCUM)}
            g = torch.Generator().manual_seed(7)
            per_rank = BATCH // world
            for _ in range(STEPS):
                x, y = torch.randn(BATCH, 13, generator=g), torch.randn(BATCH, 3, generator=g)
                mine = slice(rank * per_rank, (rank + 1) * per_rank)
                for accum, engine in runs.items():
                    micro = per_rank // accum
                    for i in range(accum):
                        part = slice(mine.start + i * micro, mine.start + (i + 1) * micro)
                        with engine.no_sync() if i + 1 < accum else contextlib.nullcontext():
                            engine.backward(loss_of(engine.wrapped(x[part]), y[part]) / accum)
                    engine.step()
                loss_of(reference(x), y).backward()
                ref_opt.step()
                ref_opt.zero_grad()
            diffs = [max((full_of(p) - r).abs().max().item() for p, r in zip(e.model.parameters(),
                                                                              reference.parameters()))
                     for e in runs.values()]
            results[(name, stage, exclude_1d)] = diffs
    return results


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_accumulated_micro_batches_equal_one_batch_on_every_engine():
    """B x 3 accumulated equals one batch of 3B, and both equal the unsharded full-batch run,
    on DDP, native ZeRO-1/2, FSDP2 and DeepSpeed ZeRO-2, with and without 1-D weight-decay
    exclusion. Tolerance 1e-6 absolute on weights of size ~0.5 after 4 SGD steps (measured at
    most 6e-8): the only difference is the order the fp32 gradient sums are added in (per
    micro-batch, per rank, per engine's reduction), ~1e-7 relative per step."""
    for rank_results in run_distributed(check_accumulation, 2, timeout=280):
        for key, diffs in rank_results.items():
            assert max(diffs) < 1e-6, (key, diffs)


# --------------------------------------------------------------- every recipe runs
def write_imagenet_shaped_set(root: Path) -> Path:
    """1000 class folders (most empty: a class index still counts), 32 train and 16 val
    40x36 JPEGs spread over them, written with the real `launch data write`."""
    for split, count in (("train", 32), ("val", 16)):
        for c in range(1000):
            (root / "src" / split / f"n{c:04d}").mkdir(parents=True)
        for i in range(count):
            c = (i * 31 + 7 * (split == "val")) % 1000
            Image.new("RGB", (40, 36), (i * 37 % 256, i * 91 % 256, c * 13 % 256)).save(
                root / "src" / split / f"n{c:04d}" / f"{i}.jpg")
    assert write_cli("--src", root / "src", "--out", root / "data", "--write-mode", "jpg",
                     "--max-resolution", "64") == 0
    return root / "data"


@pytest.fixture(scope="module")
def imagenet_shaped(tmp_path_factory):
    return write_imagenet_shaped_set(tmp_path_factory.mktemp("imagenet"))


def losses_and_top1(run_dir: Path):
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars("train/loss")], [e.value for e in acc.Scalars("val/top1")]


LENGTH_KEYS = {"data.ramp_start_epoch", "data.ramp_end_epoch", "schedule.warmup_epochs", "train.epochs"}
"""What a training-length variant (resnet50_vsgd_16ep.yaml over resnet50_vsgd.yaml) may set
besides its `recipe:` description."""


def leaf_keys(tree: dict, prefix: str = "") -> dict:
    return {k: v for key, value in tree.items()
            for k, v in (leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict)
                         else {f"{prefix}{key}": value}).items()}


def length_variant_of(recipe: Path) -> Path | None:
    """The runnable recipe this one only shortens or lengthens, or None."""
    sections = yaml.safe_load(recipe.read_text())
    base = sections.pop("base", None)
    sections.pop("recipe", None)
    if base is None or base.startswith("_") or not set(leaf_keys(sections)) <= LENGTH_KEYS:
        return None
    return recipe.parent / base


VARIANTS = {r.stem: length_variant_of(r) for r in RECIPES if length_variant_of(r)}
RUN = [r for r in RECIPES if r.stem not in VARIANTS]


def test_training_length_variants_differ_from_a_recipe_that_runs_only_in_length():
    """A variant runs the code of the recipe it is based on (which the next test runs end to
    end): only its epochs, warmup and resolution ramp differ."""
    assert set(VARIANTS) == {"resnet50_adamw_16ep", "resnet50_adamw_32ep", "resnet50_vsgd_16ep",
                             "resnet50_vsgd_32ep", "resnet50_sgd_16ep"}
    for variant, base in VARIANTS.items():
        assert base in RUN, (variant, base)
        mine, theirs = (leaf_keys(load_recipe(r, world_size=8).to_dict()) for r in (f"recipes/imagenet/{variant}.yaml",
                                                                                    base))
        differ = {k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)}
        assert {k for k in differ if not k.startswith("recipe.")} <= LENGTH_KEYS, (variant, differ)
        assert mine["train.epochs"] != theirs["train.epochs"], variant


# A resume costs a second launch (process start-up and ffcv's pipeline compile): it is checked
# on one recipe per model, every other recipe trains, checkpoints and validates once.
RESUMED = {"resnet18_vsgd", "resnet50_sgd_88ep", "vit_s16_adamw", "vit_b16_vsgd"}


@pytest.mark.dist
@pytest.mark.timeout(3600)
def test_every_imagenet_recipe_trains_checkpoints_and_resumes(imagenet_shaped, tmp_path):
    """Each recipe as written (but the length variants above), on 2 CPU processes: only the
    data folder, decoding threads, 32 px images (ViTs: 2x2 patches), a global batch of 8 and 2
    steps are overridden (bf16 runs on CPU). For one recipe per model the first launch stops
    after step 1 with a checkpoint, as a preemption would, and the same command resumes; the
    others run both steps in one launch. Each then validates and holds the step-2 checkpoint."""
    assert RUN, "no recipe found in recipes/imagenet"
    assert RESUMED <= {r.stem for r in RUN}
    for recipe in RUN:
        start = time.perf_counter()
        out = tmp_path / recipe.stem
        command = ["run", str(recipe), "--nproc", "2", f"out={out}", f"data.data_dir={imagenet_shaped}",
                   "data.num_workers=1", "data.start_res=32", "data.end_res=32", "data.val_res=32",
                   "train.global_batch=8", "max_steps=2", "train.log_every=1", "train.progress=false"]
        if recipe.stem in RESUMED:
            assert launch(command + ["train.stop_at=1"]) == 0, recipe
            assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000001"], recipe
        assert launch(command) == 0, recipe
        losses, top1 = losses_and_top1(out)
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses), (recipe, losses)
        assert len(top1) == 1 and 0 <= top1[0] <= 1, (recipe, top1)
        assert (out / "checkpoints" / "step_00000002").is_dir(), recipe
        print(f"{recipe.stem}: {time.perf_counter() - start:.0f} s")
