"""DataConfig: the data settings a recipe holds (the trainer embeds it)."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import DataError

DTYPES = ("fp16", "bf16", "fp32")
MIN_RES, MAX_RES = 8, 4096


@dataclass
class DataConfig:
    """Where the data is and how it is decoded. What the run derives (batch per rank from
    train.global_batch, seed from train.seed) and runtime facts (device, ranks) are passed
    to the build functions instead."""

    data_dir: str = ""
    """Folder with train.beton, val.beton and manifest.json (`python -m launch data write`);
    empty: the built-in digits demo, written to the cache on first use."""
    num_workers: int = 8
    """Decoding threads per rank (FFCV compiles the pipeline; use about the cores per GPU)."""
    dtype: str = "fp16"
    """Image tensor dtype: fp16, bf16 or fp32 (labels are int64)."""
    os_cache: bool = True
    """True: read through the OS page cache, random order (data fits in RAM). False: ffcv's
    process cache with quasi-random order, for data larger than RAM (single process only)."""
    start_res: int = 160
    """Train crop size until ramp_start_epoch (progressive resizing)."""
    end_res: int = 192
    """Train crop size from ramp_end_epoch on."""
    ramp_start_epoch: int = 0
    """Epoch where the linear ramp from start_res to end_res begins."""
    ramp_end_epoch: int = 0
    """Epoch where the ramp ends; equal to ramp_start_epoch: end_res from the epoch after."""
    res_step: int = 32
    """Train sizes are rounded to a multiple of this (ffcv-imagenet: 32)."""
    crop_scale_min: float = 0.08
    """Lower bound of the train crop's area fraction of the image (upper bound 1). ImageNet:
    0.08; small images such as the 32 px digits demo want ~0.35, or crops are a few pixels."""
    flip: bool = True
    """Flip train images left-right with probability 0.5 (off for data where sides matter)."""
    val_res: int = 256
    """Validation output size (ffcv-imagenet evaluates ResNet-50 at 256)."""
    val_crop_ratio: float = 224 / 256
    """Validation center crop side / shorter image side, before resizing to val_res."""
    minival: int = 0
    """Images held out of the TRAINING set as a tuning split, evaluated like val (`minival/top1`,
    ...): choose hyperparameters on it, report val. 0: off, all train images are trained on."""
    minival_seed: int = 0
    """Seed of the minival split (not train.seed: every seed of a sweep holds out the same images)."""
    randaugment_n: int = 0
    """RandAugment: ops per train image, from timm's rand-increasing set (DeiT's
    rand-m9-mstd0.5-inc1: 2), in the decoding threads after the crop (randaugment.py); 0: off."""
    randaugment_m: float = 9.0
    """RandAugment magnitude in [0, 10] (DeiT: 9)."""
    randaugment_mstd: float = 0.5
    """Standard deviation of each op's magnitude around randaugment_m (DeiT: 0.5; 0: fixed)."""
    erase_prob: float = 0.0
    """Random erasing: probability that a box of 2-33% of a train image is replaced by
    Gaussian noise of the normalized image (DeiT: 0.25); 0: off."""
    repeated_aug: int = 1
    """Repeated augmentation: each image an epoch draws is shown this many times, differently
    augmented, on different ranks, the epoch keeping its length (DeiT's RASampler: 3;
    repeated.py); 1: off."""
    mixup_alpha: float = 0.0
    """Mixup: each train batch blended with itself reversed, weight ~ Beta(alpha, alpha), soft
    targets mixed alike (DeiT: 0.8; on the device, mixup.py); 0: off."""
    cutmix_alpha: float = 0.0
    """CutMix: a box of each train image replaced by the same box of its partner in the
    reversed batch, area fraction ~ Beta(alpha, alpha), targets mixed by area (DeiT: 1.0); 0: off."""
    mix_switch_prob: float = 0.5
    """With Mixup and CutMix both on: probability that a batch gets CutMix rather than Mixup
    (DeiT: 0.5)."""

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise DataError listing every setting that cannot work."""
        problems = []
        if self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.num_workers < 1:
            problems.append(f"num_workers ({self.num_workers}) must be at least 1")
        for name in ("start_res", "end_res", "val_res"):
            res = getattr(self, name)
            if not MIN_RES <= res <= MAX_RES:
                problems.append(f"{name} {res} is outside [{MIN_RES}, {MAX_RES}] pixels")
        if self.res_step < 1 or self.res_step > min(self.start_res, self.end_res):
            problems.append(f"res_step {self.res_step} must be in [1, min(start_res, end_res)]")
        if not 0 <= self.ramp_start_epoch <= self.ramp_end_epoch:
            problems.append(f"need 0 <= ramp_start_epoch ({self.ramp_start_epoch}) <= "
                            f"ramp_end_epoch ({self.ramp_end_epoch})")
        if not 0.0 < self.val_crop_ratio <= 1.0:
            problems.append(f"val_crop_ratio {self.val_crop_ratio} must be in (0, 1]")
        if not 0.0 < self.crop_scale_min <= 1.0:
            problems.append(f"crop_scale_min {self.crop_scale_min} must be in (0, 1]")
        if self.minival < 0:
            problems.append(f"minival {self.minival} must be 0 (off) or a number of train images")
        if not isinstance(self.flip, bool):
            problems.append(f"flip {self.flip!r} must be true or false")
        if self.randaugment_n < 0:
            problems.append(f"randaugment_n {self.randaugment_n} must be >= 0 ops per image (0: off; DeiT: 2)")
        if not 0.0 <= self.randaugment_m <= 10.0:
            problems.append(f"randaugment_m {self.randaugment_m} must be a magnitude in [0, 10] (DeiT: 9)")
        if self.randaugment_mstd < 0:
            problems.append(f"randaugment_mstd {self.randaugment_mstd} must be >= 0 (DeiT: 0.5)")
        if not 0.0 <= self.erase_prob <= 1.0:
            problems.append(f"erase_prob {self.erase_prob} must be a probability in [0, 1] (DeiT: 0.25)")
        if self.repeated_aug < 1:
            problems.append(f"repeated_aug {self.repeated_aug} must be >= 1 (1: off; DeiT: 3)")
        elif self.repeated_aug > 1 and not self.os_cache:
            problems.append(f"repeated_aug {self.repeated_aug} needs os_cache=true (ffcv's process cache reads "
                            f"by sample index, and the repeated order holds copies)")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} {getattr(self, name)} must be >= 0 (0: off)")
        if not 0.0 <= self.mix_switch_prob <= 1.0:
            problems.append(f"mix_switch_prob {self.mix_switch_prob} must be a probability in [0, 1]")
        if problems:
            raise DataError("invalid data config: " + "; ".join(problems))
