"""Hints for unknown recipe keys, by meaning first: the names users bring from timm,
torchvision's reference scripts, DeiT, ffcv-imagenet and DeepSpeed configs, mapped to ours.
Spelling (difflib) comes second, and a key with neither gets its section's list of keys."""
from __future__ import annotations

import difflib

PER_GPU = "images per step over all GPUs; a per-GPU batch_size times the GPU count"
MEANINGS = {
    # learning rate and its schedule
    **dict.fromkeys(["learning_rate", "lr", "base_lr", "blr", "max_lr", "peak_lr", "init_lr"],
                    "optim.lr (with optim.lr_base_batch, the batch that LR is meant for: it then scales with "
                    "train.global_batch)"),
    **dict.fromkeys(["min_lr", "lr_min", "eta_min", "end_lr", "final_lr"],
                    "schedule.min_lr_ratio (the final LR as a fraction of the peak)"),
    **dict.fromkeys(["warmup_epochs", "lr_warmup_epochs", "lr_peak_epoch", "warmup"], "schedule.warmup_epochs"),
    **dict.fromkeys(["warmup_steps", "warmup_iters", "warmup_num_steps", "lr_warmup_steps"], "schedule.warmup_steps"),
    **dict.fromkeys(["sched", "scheduler", "lr_scheduler", "lr_schedule", "lr_schedule_type", "schedule"],
                    "schedule.name"),
    **dict.fromkeys(["lr_step_size", "decay_epochs", "step_epochs", "lr_steps"], "schedule.step_epochs"),
    **dict.fromkeys(["lr_gamma", "decay_rate", "gamma"], "schedule.step_gamma"),
    # optimizer
    **dict.fromkeys(["opt", "optimizer", "optimizer_name", "optim", "opt_name", "type"],
                    "optim.name (or optimizer=NAME on the command line)"),
    **dict.fromkeys(["weight_decay", "wd", "decay"], "optim.weight_decay"),
    **dict.fromkeys(["momentum", "sgd_momentum"], "optim.sgd.momentum"),
    **dict.fromkeys(["betas", "beta1", "opt_betas"], "optim.adamw.beta1 and optim.adamw.beta2"),
    **dict.fromkeys(["eps", "opt_eps", "epsilon"], "optim.adamw.eps (each optimizer has its own: optim.<name>.eps)"),
    **dict.fromkeys(["norm_weight_decay", "bias_weight_decay", "no_bias_decay", "filter_bias_and_bn"],
                    "optim.wd_exclude_1d"),
    **dict.fromkeys(["clip_grad", "clip_grad_norm", "max_grad_norm", "gradient_clipping", "grad_clip_norm"],
                    "train.grad_clip"),
    # batch and steps
    **dict.fromkeys(["batch_size", "train_batch_size", "global_batch_size", "batch", "bs", "total_batch_size"],
                    f"train.global_batch ({PER_GPU})"),
    **dict.fromkeys(["train_micro_batch_size_per_gpu", "micro_batch_size", "per_device_train_batch_size"],
                    "train.global_batch / (GPUs x train.accum_steps): set train.global_batch and train.accum_steps"),
    **dict.fromkeys(["gradient_accumulation_steps", "accum_iter", "grad_accum_steps", "accumulation_steps",
                     "accum_freq", "update_freq"], "train.accum_steps"),
    **dict.fromkeys(["epochs", "num_epochs", "max_epochs", "n_epochs"], "train.epochs"),
    **dict.fromkeys(["steps", "iterations", "iters", "total_steps", "train_iters", "max_iters", "num_steps"],
                    "train.max_steps (0: train.epochs decides)"),
    # resolution and data
    **dict.fromkeys(["resolution", "res", "img_size", "image_size", "input_size", "crop_size", "train_crop_size",
                     "max_res", "final_res"],
                    "data.end_res (training resolution; data.start_res for progressive resizing, data.val_res "
                    "for validation)"),
    **dict.fromkeys(["min_res", "start_resolution", "initial_res"], "data.start_res"),
    **dict.fromkeys(["val_resolution", "val_crop_size", "val_resize_size", "test_res", "eval_res", "val_size"],
                    "data.val_res"),
    **dict.fromkeys(["data_path", "data", "dataset", "data_root", "root", "train_dataset", "val_dataset",
                     "train_path", "imagenet_dir"], "data.data_dir (a folder written by launch data write)"),
    **dict.fromkeys(["num_workers", "workers", "j", "loader_workers"], "data.num_workers"),
    **dict.fromkeys(["aa", "auto_augment", "autoaugment", "randaugment", "rand_augment"],
                    "data.randaugment_n and data.randaugment_m"),
    **dict.fromkeys(["reprob", "random_erase", "random_erasing", "erasing"], "data.erase_prob"),
    **dict.fromkeys(["repeated_aug", "repeated_augmentation", "ra_sampler", "ra_reps"], "data.repeated_aug"),
    **dict.fromkeys(["mixup", "mixup_alpha"], "data.mixup_alpha"),
    **dict.fromkeys(["cutmix", "cutmix_alpha"], "data.cutmix_alpha"),
    **dict.fromkeys(["scale", "crop_scale", "min_scale"], "data.crop_scale_min"),
    # model
    **dict.fromkeys(["model", "arch", "architecture", "net", "model_name", "backbone"],
                    "model.name (or model=NAME on the command line)"),
    **dict.fromkeys(["drop_path", "drop_path_rate", "stochastic_depth", "stochastic_depth_prob"], "model.drop_path"),
    **dict.fromkeys(["use_blurpool", "blurpool"], "model.blurpool"),
    **dict.fromkeys(["torch_compile", "compile"], "model.compile"),
    # training loop
    **dict.fromkeys(["smoothing", "label_smoothing"], "train.label_smoothing"),
    **dict.fromkeys(["model_ema", "model_ema_decay", "ema", "ema_decay"], "train.ema_decay (0: no EMA)"),
    **dict.fromkeys(["amp", "fp16", "bf16", "mixed_precision", "precision"], "train.precision (fp32 or bf16)"),
    **dict.fromkeys(["output_dir", "out_dir", "output", "log_dir", "save_dir", "checkpoint_dir", "ckpt_dir"],
                    "train.out (launch run's out=; a SLURM job takes --out)"),
    **dict.fromkeys(["print_freq", "log_freq", "log_interval", "steps_per_print", "log_every_n_steps"],
                    "train.log_every"),
    **dict.fromkeys(["save_freq", "checkpoint_freq", "ckpt_freq", "save_every", "save_interval"], "train.ckpt_every"),
    **dict.fromkeys(["eval_freq", "val_freq", "eval_every", "eval_interval"], "train.val_every_epochs"),
    **dict.fromkeys(["lr_tta", "tta", "test_time_flip"], "train.val_flip"),
    **dict.fromkeys(["random_seed", "manual_seed"], "train.seed"),
    # engines
    **dict.fromkeys(["zero_optimization", "zero_stage", "stage"], "engine.zero_stage (with engine.name=zero or "
                                                                  "deepspeed)"),
    **dict.fromkeys(["distributed", "strategy", "fsdp", "ddp", "backend"], "engine.name (ddp, zero, fsdp2, deepspeed)"),
}


def key_hint(key: str, section_keys: list[str], listing: list[str] | None = None) -> str:
    """'; for KEY use X' for a name we know by meaning, else '; did you mean X?' by spelling,
    else the keys of its section. `section_keys`: the full dotted keys `key` could be;
    `listing`: what to list instead of them (at the top level: the sections)."""
    leaf = key.rsplit(".", 1)[-1]
    meaning = MEANINGS.get(leaf.lower().replace("-", "_"))
    if meaning:
        return f"; for {leaf!r} use {meaning}"
    leaves = {k.rsplit(".", 1)[-1]: k for k in section_keys}
    close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {leaves[close[0]]!r}?"
    return f"; the keys here are: {', '.join(listing or sorted(section_keys))}"
