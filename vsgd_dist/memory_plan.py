"""What one GPU holds for a recipe at a world size, before anything is queued.

Weights, gradients, fp32 masters and optimizer state are counted from the model's
parameter shapes (built on the meta device: no memory) with the engines' own layouts: the
ZeRO bucket plan with its padding (`vsgd_dist.sharding.layout.plan`), FSDP2's dim-0 shards,
DDP's whole tensors. The optimizer state is exactly what the engines allocate (tested on 1-3
CPU ranks); DeepSpeed's partitions are counted without its alignment padding (a few
elements per group). The activation peak is measured by one forward/backward of the model
at the batch per GPU and the recipe's resolution and precision on fake tensors (shapes
without storage) by torch's MemTracker: what is alive at the peak besides weights and
gradients (activations saved for backward and temporaries)."""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

STATE_TENSORS = {"vsgd": 3, "adamw": 2, "ivon": 2, "sgd": 1}
"""fp32 state tensors each optimizer keeps per weight (SGD: its momentum buffer)."""
FP32 = 4
HEADROOM = 0.9
"""Share of a GPU's memory a plan may fill: CUDA's context, cuDNN workspaces, the caching
allocator's fragmentation and the data loader's buffers take the rest."""


@dataclass
class MemoryPlan:
    """Bytes one GPU holds (the largest rank), by kind."""

    engine: str
    """Engine name, with its ZeRO stage where it has one."""
    world_size: int
    """Ranks (GPUs) in the run."""
    shards: int
    """Ranks the sharded state is split over (the world, or a node's ranks with shard_within=node)."""
    batch_per_gpu: int
    """Images per micro-batch on one GPU."""
    resolution: int
    """Training image side, pixels."""
    weights: int
    """The model's parameters as the engine keeps them (FSDP2: its shard plus the largest
    gathered block)."""
    gradients: int
    """Gradients at their peak, just before the optimizer step."""
    masters: int
    """fp32 master copies beyond the weights themselves (bf16 weights under ZeRO, DeepSpeed's
    fp32 partitions)."""
    optimizer_state: int
    """Per-weight optimizer state (exact for ddp, zero and fsdp2)."""
    ema: int
    """fp32 weight EMA (train.ema_decay), whole on every rank."""
    activations: int
    """Peak of activations and temporaries in one forward/backward at batch_per_gpu."""

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.masters + self.optimizer_state + self.ema + self.activations


def _numel_rows(shape: tuple[int, ...], shards: int, rank: int) -> int:
    """Elements of `rank`'s dim-0 shard (torch.chunk's split, as FSDP2 cuts)."""
    if not shape:
        return 1 if rank == 0 else 0
    chunk = math.ceil(shape[0] / shards)
    rows = max(0, min(shape[0], (rank + 1) * chunk) - rank * chunk)
    return rows * math.prod(shape[1:])


def state_elements_per_rank(cfg, model: torch.nn.Module, shards: int, rank: int = 0) -> int:
    """Elements of one optimizer-state tensor that `rank` holds, laid out as the engine lays
    it out (ZeRO: its padded bucket shards; FSDP2: dim-0 shards; DDP: everything)."""
    from vsgd_dist.optim import named_param_groups
    from vsgd_dist.sharding.layout import plan

    groups = named_param_groups(model, cfg.optim.weight_decay, cfg.optim.wd_exclude_1d)
    named = [list(zip(g["param_names"], g["params"])) for g in groups]
    engine = cfg.engine.name
    if engine == "zero":
        _, buckets = plan(named, shards, int(cfg.engine.bucket_mb * 2**20))
        return sum(b.shard_numel for b in buckets)
    if engine == "fsdp2":
        return sum(_numel_rows(tuple(p.shape), shards, rank) for group in named for _, p in group)
    total = [sum(p.numel() for _, p in group) for group in named]
    if engine == "deepspeed":
        return sum(math.ceil(n / shards) for n in total)
    return sum(total)


def state_tensors(cfg) -> int:
    """fp32 state tensors per weight for the recipe's optimizer."""
    if cfg.optim.name == "sgd" and not cfg.optim.hparams.momentum:
        return 0
    return STATE_TENSORS[cfg.optim.name]


def meta_model(cfg, num_classes: int) -> torch.nn.Module:
    from vsgd_dist.models import build_model

    with torch.device("meta"):
        return build_model(cfg.model.name, num_classes, image_size=cfg.data.end_res, blurpool=cfg.model.blurpool,
                           drop_path=cfg.model.drop_path, seed=cfg.train.seed)


def activation_peak(cfg, num_classes: int, batch: int) -> int:
    """Activations and temporaries alive at the peak of one forward/backward, measured on
    fake tensors (no storage is allocated, so any batch costs the same to measure)."""
    m = cfg.model
    return _activation_peak(m.name, num_classes, cfg.data.end_res, m.blurpool, m.drop_path, cfg.train.seed,
                            cfg.train.precision == "bf16", batch)


@functools.lru_cache(maxsize=None)
def _activation_peak(model_name: str, num_classes: int, resolution: int, blurpool: bool, drop_path: float, seed: int,
                     bf16: bool, batch: int) -> int:
    from vsgd_dist.compat.torch import fake_activation_peak
    from vsgd_dist.models import build_model

    with torch.device("meta"):  # initialisers that read values (trunc_normal_) cannot run on fake tensors
        model = build_model(model_name, num_classes, image_size=resolution, blurpool=blurpool, drop_path=drop_path,
                            seed=seed)

    def forward_backward(fake_model: torch.nn.Module) -> None:
        images = torch.randn(batch, 3, resolution, resolution)
        labels = torch.zeros(batch, dtype=torch.long)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(fake_model(images), labels)
        loss.backward()

    return fake_activation_peak(model, forward_backward)


def memory_plan(cfg, world_size: int, num_classes: int, ranks_per_node: int | None = None) -> MemoryPlan:
    """The per-GPU plan of `cfg` (a RunConfig) on `world_size` ranks."""
    engine, stage = cfg.engine.name, cfg.engine.zero_stage
    shards = (ranks_per_node or world_size) if cfg.engine.shard_within == "node" else world_size
    if engine == "ddp":
        shards = 1
    model = meta_model(cfg, num_classes)
    params = [p for p in model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in params)
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    state_elements = state_elements_per_rank(cfg, model, shards)
    state = state_tensors(cfg) * state_elements * FP32
    masters = 0
    if engine == "ddp":
        weights, gradients = weight_bytes, 2 * weight_bytes if world_size > 1 else weight_bytes  # .grad + DDP buckets
    elif engine == "zero":
        weights = state_elements * shards * params[0].element_size()  # the padded flat buckets
        # stage 2: each bucket's full fp32 gradient is kept until the step, plus the rank's shard;
        # stage 1: DDP's .grad and buckets, plus the owned fp32 slice
        gradients = state_elements * shards * FP32 + state_elements * FP32
        if stage == 1:
            gradients += weight_bytes
    elif engine == "fsdp2":
        from vsgd_dist.engines.fsdp2 import model_blocks

        largest_block = max((sum(p.numel() for p in b.parameters()) for b in model_blocks(model)), default=0)
        gathered = 2 if cfg.train.precision == "bf16" else FP32
        weights = state_elements * FP32 + largest_block * gathered
        gradients = state_elements * FP32 + largest_block * FP32
    else:  # deepspeed: ZeRO-1/2 over the model's own (fp32 or bf16) weights, fp32 partitions
        low = 2 if cfg.train.precision == "bf16" else FP32
        weights = numel * low
        masters = state_elements * FP32
        gradients = numel * low if stage == 1 else state_elements * FP32 + int(cfg.engine.bucket_mb * 2**20)
    batch = cfg.train.global_batch // (world_size * cfg.train.accum_steps)
    return MemoryPlan(engine=f"{engine}" + (f" stage {stage}" if engine in ("zero", "deepspeed") else ""),
                      world_size=world_size, shards=shards, batch_per_gpu=batch, resolution=cfg.data.end_res,
                      weights=weights, gradients=gradients, masters=masters, optimizer_state=state,
                      ema=numel * FP32 if cfg.train.ema_decay else 0,
                      activations=activation_peak(cfg, num_classes, batch))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def plan_lines(cfg, world_size: int, gpu_memory_bytes: int | None = None, num_classes: int = 1000,
               ranks_per_node: int | None = None) -> list[str]:
    """The plan as printable lines; with `gpu_memory_bytes`, whether it fits and, when it
    does not, what would."""
    p = memory_plan(cfg, world_size, num_classes, ranks_per_node)
    lines = [f"memory plan per GPU: {cfg.model.name}, {cfg.optim.name} on {p.engine}, {world_size} GPU(s), state "
             f"split over {p.shards}, {p.batch_per_gpu} images of {p.resolution} px per micro-batch "
             f"({cfg.train.precision})",
             f"  weights          {_gib(p.weights)}",
             f"  gradients        {_gib(p.gradients)}",
             f"  fp32 masters     {_gib(p.masters)}",
             f"  optimizer state  {_gib(p.optimizer_state)} ({state_tensors(cfg)} fp32 tensor(s) per weight)"]
    if p.ema:
        lines.append(f"  weight EMA       {_gib(p.ema)}")
    lines += [f"  activations      {_gib(p.activations)} (peak of one forward/backward, measured on fake tensors)",
              f"  total            {_gib(p.total)}"]
    if gpu_memory_bytes is None:
        return lines
    budget = gpu_memory_bytes * HEADROOM
    if p.total <= budget:
        return lines + [f"fits: {_gib(p.total)} of {_gib(gpu_memory_bytes)} ({HEADROOM:.0%} usable)"]
    return lines + [f"does not fit: {_gib(p.total)} needed, {_gib(budget)} usable of {_gib(gpu_memory_bytes)}; "
                    + "; ".join(_what_fits(cfg, world_size, budget, p, num_classes, ranks_per_node))]


def _what_fits(cfg, world_size: int, budget: float, p: MemoryPlan, num_classes: int,
               ranks_per_node: int | None) -> list[str]:
    """Changes that bring the plan under `budget`: train.accum_steps, another engine or stage,
    more GPUs (each checked with the same plan)."""
    fixed = p.total - p.activations
    ideas = []
    for accum in (2, 4, 8, 16):
        batch = cfg.train.global_batch // (world_size * cfg.train.accum_steps * accum)
        if cfg.train.global_batch % (world_size * cfg.train.accum_steps * accum) or batch < 1:
            break
        if fixed + p.activations * batch / p.batch_per_gpu <= budget:  # activations scale with the batch
            ideas.append(f"train.accum_steps={cfg.train.accum_steps * accum} ({batch} images per micro-batch)")
            break
    options = [("zero", 2), ("fsdp2", cfg.engine.zero_stage)]
    for engine, stage in options:
        if (engine, stage) == (cfg.engine.name, cfg.engine.zero_stage) or cfg.engine.name == "fsdp2":
            continue
        other = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, name=engine, zero_stage=stage))
        alt = memory_plan(other, world_size, num_classes, ranks_per_node)
        if alt.total <= budget:
            ideas.append(f"engine={engine}" + (" engine.zero_stage=2" if engine == "zero" else "")
                         + f" ({_gib(alt.total)})")
            break
    for more in (2, 4, 8):
        n = world_size * more
        if cfg.train.global_batch % (n * cfg.train.accum_steps):
            break
        if memory_plan(cfg, n, num_classes, ranks_per_node).total <= budget:
            ideas.append(f"{n} GPUs")
            break
    return ideas or ["nothing simple fits: a smaller model or resolution, or GPUs with more memory"]
