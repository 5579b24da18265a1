"""Training images/s at 64 px on N CPU processes, VSGD (and on ViT-S/16 IVON) against AdamW, as
their ImageNet recipes configure them (engine, ZeRO stage, fused optimizers, weight decay,
label smoothing, channels_last, BlurPool; ViT-S/16: DeiT's Mixup/CutMix with soft targets
and stochastic depth).

Synthetic data (random normalized images and labels, the same every step), so the number is
the model, the engine, the optimizer and the recipe's per-step work on the device, not the
loader (RandAugment, erasing and repeated augmentation run in the loader's decoding threads:
bench/data_loading.py). Every rank builds every recipe's engine over its own copy of the
model, and they step in turn (forward, backward, the engine's step), so load on the machine
hits all alike; images/s = global batch / median step time of the slowest rank. The recipes
leave the parameters' all-gather running after a step (engine.prefetch_params); here it is
waited for inside the timed step, so no engine's gather hides in another's time. A second
table runs VSGD alone for `--steps` consecutive steps with and without that prefetch: the
overlap with the next forward.

ViT-S/16 has no IVON recipe; its row is the AdamW recipe with resnet50_ivon.yaml's optim
section (the IVON authors' ImageNet hyperparameters, ess = ImageNet-1k's train set).

    python bench/train_throughput.py [--model resnet50|vit_s16] [--nproc 2] [--batch 32] [--res 64] [--steps 8]

Targets: VSGD's images/s >= 0.97 of AdamW's; IVON's >= 0.90 of AdamW's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vsgd_dist.config import load_recipe  # noqa: E402
from vsgd_dist.data.mixup import BatchMixer  # noqa: E402
from vsgd_dist.engines.sampling import WeightSampling  # noqa: E402
from vsgd_dist.models import build_model  # noqa: E402
from vsgd_dist.models.drop_path import drop_path_draws  # noqa: E402
from vsgd_dist.optim import OPTIMIZERS  # noqa: E402
from vsgd_dist.spawn import run_distributed  # noqa: E402
from vsgd_dist.train.engine_setup import engine_for  # noqa: E402

RECIPES = {"resnet50": {"vsgd": ("resnet50_vsgd.yaml", ()), "adamw": ("resnet50_adamw.yaml", ())},
           "vit_s16": {"vsgd": ("vit_s16_vsgd.yaml", ()), "adamw": ("vit_s16_adamw.yaml", ()),
                       "ivon": ("vit_s16_adamw.yaml", ("optim.name=ivon", "optim.lr=2.5", "optim.lr_base_batch=1024",
                                                       "optim.weight_decay=5e-5", "optim.fused=true",
                                                       "optim.ivon.ess=1281167", "optim.ivon.hess_init=0.05",
                                                       "optim.ivon.beta2=0.999995", "optim.ivon.mc_samples=1"))}}
"""Per model: optimizer -> (recipe in recipes/imagenet, overrides)."""
TARGETS = {"vsgd": 0.97, "ivon": 0.90}
"""Images/s of each optimizer's recipe / AdamW's."""


class RecipeStep:
    """One recipe's model, engine and per-step work: the batch mixed (Mixup/CutMix) and the
    drop-path masks drawn when the recipe has them, a forward/backward per weight sample,
    the engine's step."""

    def __init__(self, model_name: str, optimizer: str, res: int, rank: int, prefetch: bool | None = None):
        file, overrides = RECIPES[model_name][optimizer]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.cfg = cfg = load_recipe(os.path.join(root, "recipes", "imagenet", file), list(overrides))
        if prefetch is not None:
            cfg.engine.prefetch_params = prefetch
        torch.manual_seed(0)
        model = build_model(cfg.model.name, 1000, image_size=res, blurpool=cfg.model.blurpool,
                            drop_path=cfg.model.drop_path, seed=cfg.train.seed)
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.rank, self.drop_path = rank, drop_path_draws(model)
        data = cfg.data
        self.mixer = (BatchMixer(1000, cfg.train.seed, data.mixup_alpha, data.cutmix_alpha, data.mix_switch_prob)
                      if data.mixup_alpha > 0 or data.cutmix_alpha > 0 else None)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
        self.engine = engine_for(model, cfg, cfg.optim.lr)
        self.sampling = WeightSampling(self.engine, cfg.train.grad_clip)

    def describe(self) -> str:
        cfg = self.cfg
        return (f"{cfg.optim.name}: engine {cfg.engine.name} stage {cfg.engine.zero_stage}, fused "
                f"{OPTIMIZERS.get(cfg.optim.name).use_fused(cfg.optim.fused)}"
                f"{', Mixup/CutMix' if self.mixer else ''}{', drop path' if self.drop_path else ''}")

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> float:
        """Forward/backward of every weight sample; returns the seconds spent drawing them."""
        engine, targets, sampling = self.engine, labels, 0.0
        if self.mixer is not None:
            images, targets = self.mixer(images, labels, 0, step)
        for k in range(self.sampling.mc_samples):
            start = time.perf_counter()
            self.sampling.sample(k)
            sampling += time.perf_counter() - start
            if self.drop_path is not None:
                self.drop_path.draw(images.shape[0], 0, step, self.rank, images.device)
            engine.backward(self.criterion(engine.wrapped(images), targets))
            if k + 1 < self.sampling.mc_samples:
                self.sampling.accumulate()
        return sampling


def synthetic_batch(rank: int, batch: int, res: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)
    images = torch.randn(batch, 3, res, res, generator=generator).to(memory_format=torch.channels_last)
    return images, torch.randint(0, 1000, (batch,), generator=generator)


def bench_rank(rank, world_size, model_name, batch, res, steps, warmup):
    torch.set_num_threads(1)
    recipes = {name: RecipeStep(model_name, name, res, rank) for name in RECIPES[model_name]}
    images, labels = synthetic_batch(rank, batch, res)
    times = {name: [] for name in recipes}
    phases = {name: [] for name in recipes}
    for i in range(warmup + steps):
        for name, recipe in recipes.items():
            dist.barrier()
            start = time.perf_counter()
            sampling = recipe.forward_backward(images, labels, i)
            middle = time.perf_counter()
            recipe.engine.step()
            # A prefetched gather ends here, not in the other engine's barrier. A sampling step
            # (IVON) leaves its gather to the next sample, as in training: no mean_weights(),
            # which the trainer calls only for EMA and validation.
            recipe.engine.wait_for_parameters()
            end = time.perf_counter()
            seconds = torch.tensor([end - start, end - middle + sampling])
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
            if i >= warmup:
                times[name].append(seconds[0].item())
                phases[name].append(seconds[1].item())
    setup = "; ".join(recipe.describe() for recipe in recipes.values())
    return {name: (statistics.median(times[name]), statistics.median(phases[name])) for name in recipes}, setup


def overlap_rank(rank, world_size, model_name, batch, res, steps, warmup):
    """Seconds per step of VSGD's recipe over `steps` consecutive steps (slowest rank), with
    the parameters' all-gather waited for in the step and left to the next forward."""
    torch.set_num_threads(1)
    images, labels = synthetic_batch(rank, batch, res)
    result = {}
    for prefetch in (False, True):
        recipe = RecipeStep(model_name, "vsgd", res, rank, prefetch)
        engine = recipe.engine
        for i in range(warmup + steps):
            if i == warmup:
                WeightSampling(engine).mean_weights()
                dist.barrier()
                start = time.perf_counter()
            recipe.forward_backward(images, labels, i)
            engine.step()
        WeightSampling(engine).mean_weights()
        seconds = torch.tensor([(time.perf_counter() - start) / steps])
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        result[prefetch] = seconds.item()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(RECIPES), default="resnet50",
                        help="resnet50: VSGD and AdamW; vit_s16: VSGD, AdamW and IVON, DeiT augmentation on")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="images per rank per step")
    parser.add_argument("--res", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    model = {"resnet50": "ResNet-50", "vit_s16": "ViT-S/16"}[args.model]
    print(f"torch {torch.__version__}, {args.nproc} processes x 1 thread, {model} at {args.res} px, "
          f"{args.batch} images per rank, median of {args.steps} steps; load average {os.getloadavg()[0]:.1f}")
    common = (args.model, args.batch, args.res, args.steps, args.warmup)
    result, setup = run_distributed(bench_rank, args.nproc, *common, timeout=7200)[0]
    files = ", ".join(file for file, _ in RECIPES[args.model].values())
    print(f"recipes/imagenet/{{{files}}}: {setup}; load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| optimizer | images/s | step s | of which optimizer (sample, step) s |")
    print("|---|---|---|---|")
    for name, (seconds, step) in result.items():
        print(f"| {name} | {args.nproc * args.batch / seconds:.1f} | {seconds:.3f} | {step:.3f} |")
    print()
    for name, target in TARGETS.items():
        if name in result:
            ratio = result["adamw"][0] / result[name][0]
            print(f"THROUGHPUT {args.model} {args.res}px x {args.nproc}: {name.upper()}/AdamW images/s {ratio:.3f} "
                  f"(target >= {target}) {'OK' if ratio >= target else 'MISS'}")
    overlap = run_distributed(overlap_rank, args.nproc, *common, timeout=7200)[0]
    print(f"\nVSGD alone, {args.steps} consecutive steps; load average {os.getloadavg()[0]:.1f}\n")
    print("| parameters' all-gather | step s | images/s |\n|---|---|---|")
    for prefetch, seconds in overlap.items():
        label = "left to the next forward (prefetch)" if prefetch else "waited for in the step"
        print(f"| {label} | {seconds:.3f} | {args.nproc * args.batch / seconds:.1f} |")
    return 0


if __name__ == "__main__":
    from results import run_recorded

    sys.exit(run_recorded("train_throughput", main))
