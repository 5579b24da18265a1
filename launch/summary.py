"""The block a dry run starts with: the answers to a user's first questions about a job
(how many ranks, how many images each takes per step, how long it may run, where it writes
and logs), and what changes when a recipe written for one GPU count runs on another."""
from __future__ import annotations

from pathlib import Path

from launch.clusters import ClusterProfile, format_minutes
from launch.preflight import DEMO
from launch.slurm import JobSpec


def words(minutes: int) -> str:
    """1590 -> '1 day 2 h 30 min'."""
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    parts = [f"{days} day{'s' if days > 1 else ''}" if days else "", f"{hours} h" if hours else "",
             f"{mins} min" if mins else ""]
    return " ".join(p for p in parts if p)


def batch_lines(recipe: dict, world: int) -> list[str]:
    """Images per rank per step, accumulation, and the learning rate the run will use."""
    train, optim = recipe["train"], recipe["optim"]
    per_rank = train["global_batch"] // world
    accum = train["accum_steps"]
    micro = f" in {accum} micro-batches of {per_rank // accum} (train.accum_steps)" if accum > 1 else \
        " (no accumulation: train.accum_steps=1)"
    lines = [f"batch:        global {train['global_batch']} = {world} ranks x {per_rank} images per rank per step"
             + micro]
    if optim.get("lr_base_batch"):
        scale = train["global_batch"] / optim["lr_base_batch"]
        lines.append(f"lr:           peak {optim['lr'] * scale:g} = optim.lr {optim['lr']:g} x global batch "
                     f"{train['global_batch']} / optim.lr_base_batch {optim['lr_base_batch']}")
    else:
        lines.append(f"lr:           peak {optim['lr']:g} (optim.lr; optim.lr_base_batch 0: no batch scaling)")
    written_for = recipe.get("recipe", {}).get("gpus") or 0
    if written_for and written_for != world:
        was = train["global_batch"] // written_for
        lr = ("the peak LR does not change either (it follows the global batch, not the GPU count)"
              if optim.get("lr_base_batch") else "optim.lr does not change")
        lines.append(f"NOTE:         the recipe is written for {written_for} GPUs (recipe.gpus), this job has {world} "
                     f"ranks: the global batch stays {train['global_batch']}, so each rank takes {per_rank} images per "
                     f"step instead of {was}; {lr}. To keep {was} per rank instead, set "
                     f"train.global_batch={was * world} (the LR then scales with it"
                     + (")" if optim.get("lr_base_batch") else ": set optim.lr yourself)"))
    return lines


def memory_lines(recipe: dict, spec: JobSpec, profile: ClusterProfile) -> list[str]:
    """The memory one GPU needs for `recipe` at the job's world size (vsgd_dist/memory_plan.py);
    with the profile's gpu_memory_gib, whether it fits and what would."""
    from launch.plan import num_classes
    from vsgd_dist.config import build_config
    from vsgd_dist.memory_plan import plan_lines

    cfg = build_config(recipe, [], spec.world_size, source="the resolved recipe")
    memory = int(profile.gpu_memory_gib * 2**30) if profile.gpu_memory_gib else None
    return plan_lines(cfg, spec.world_size, memory, num_classes(cfg.data.data_dir),
                      ranks_per_node=spec.gpus_per_node or spec.ntasks_per_node)


def dry_run_summary(spec: JobSpec, profile: ClusterProfile, job_dir: Path, recipes: dict[str, dict],
                    real_trainer: bool, data_problems: dict[str, str] | None, array: bool) -> list[str]:
    """Lines of the summary. `recipes`: point name ('' for a single job) -> resolved recipe;
    `data_problems`: data folder -> why it cannot be read from here (None: not checked)."""
    unit = "GPUs" if spec.gpus_per_node else "tasks"
    per_node = spec.gpus_per_node or spec.ntasks_per_node
    logs = job_dir / "submitit" / ("%A_%a_0_log" if array else "%j_0_log")
    lines = [f"cluster:      {profile.name} ({profile.source}), partition {spec.partition or '(default)'}",
             f"ranks:        {spec.nodes} node{'s' if spec.nodes > 1 else ''} x {per_node} {unit} = "
             f"{spec.world_size} ranks, {spec.cpus_per_task} CPU core(s) each",
             f"time limit:   {words(spec.time)} ({format_minutes(spec.time)}); USR2 {spec.signal_delay_s} s before it: "
             f"checkpoint, then requeue"]
    first = next(iter(recipes.values()))
    if real_trainer:
        lines += batch_lines(first, spec.world_size)
        lines += memory_lines(first, spec, profile)
    lines.append(f"job folder:   {job_dir}")
    if array:
        lines.append(f"run folders:  {job_dir}/<point>/run for {len(recipes)} points: {', '.join(recipes)}")
    else:
        lines.append(f"run folder:   {job_dir / 'run'} (checkpoints/, tb/)")
    lines.append(f"logs:         {logs}.err (training: progress, loss), {logs}.out (launcher); "
                 f"{'%A/%a: array job/task' if array else '%j: the job id'}")
    if real_trainer:
        folders = sorted({r['data']['data_dir'] or DEMO for r in recipes.values()})
        for folder in folders:
            if data_problems is None:
                lines.append(f"data:         {folder}: not checked (--no-data-check)")
                continue
            problem = data_problems.get(folder)
            lines.append(f"data:         {folder}: " + (f"CANNOT BE READ HERE: {problem}; submit refuses this "
                                                        f"(--no-data-check if only the compute nodes see it)"
                                                        if problem else "ok (manifest and .beton files)"))
    return ["# dry run summary", *lines]
