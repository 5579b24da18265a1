"""Images/second: FFCV train and val loaders vs a PIL + torch DataLoader baseline, and the
FFCV train loader with and without the DeiT augmentation.

Same JPEG files, same number of worker processes/threads, same augmentations (random
resized crop, horizontal flip, ImageNet normalization to fp32). The baseline uses PIL,
numpy and torch only: torchvision does not import with the CPU build of torch here. The
DeiT rows add what the ViT-S recipe turns on in the loader: RandAugment (2 ops, m 9, mstd
0.5) and random erasing (p 0.25) in the decoding threads, and repeated augmentation x3.
Mixup 0.8 / CutMix 1.0 runs on the device in training; its cost per batch on this CPU is
timed on its own.

Each FFCV row also gives the CPU time per image, over all of the process's threads: on a
machine others share, images/s moves with their load, the CPU time per image much less.
`--rounds N` times the train loaders with and without the DeiT augmentation N times in
turn, and reports medians and the median of the rounds' ratios.

    python bench/data_loading.py                       # 2000 generated JPEGs, 300-500 px
    python bench/data_loading.py --src /data/imagenet  # an existing ImageFolder tree
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vsgd_dist.data import DataConfig, WriteSettings, build_train_loader, build_val_loader, train_epoch
from vsgd_dist.data.image_folder import find_classes, list_images, write_image_folder
from vsgd_dist.data.loaders import IMAGENET_MEAN, IMAGENET_STD
from vsgd_dist.data.mixup import BatchMixer

# Images/s one A100 consumes training ResNet-50 in ffcv-imagenet (github.com/libffcv/ffcv-imagenet,
# rn50 table): 8xA100, 16 epochs of ImageNet-1k (1,281,167 train images) at res ~160-171 in 14.9 min.
A100_RESNET50_IMAGES_PER_S = 16 * 1_281_167 / (14.9 * 60) / 8


def generate_jpegs(root: Path, count: int, sides: tuple[int, int], classes: int = 10, seed: int = 0) -> None:
    """Photo-like JPEGs (smooth colour fields plus grain), sides in `sides` px, quality 90.
    The same files serve as train/ and val/ (hard links), so both loaders read identical data."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = rng.integers(sides[0], sides[1] + 1, size=2)
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((int(w), int(h)), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)
        paths = [root / split / f"class{i % classes:02d}" / f"{i:05d}.JPEG" for split in ("train", "val")]
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(paths[0], quality=90)
        os.link(paths[0], paths[1])


class PILTrainImages(torch.utils.data.Dataset):
    """What torchvision's ImageFolder + RandomResizedCrop + flip + ToTensor + Normalize do."""

    def __init__(self, samples: list[tuple[str, int]], res: int):
        self.samples, self.res = samples, res
        self.mean = np.asarray(IMAGENET_MEAN, np.float32)
        self.inv_std = 1 / np.asarray(IMAGENET_STD, np.float32)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        with Image.open(path) as img:
            img = img.convert("RGB")
        img = img.resize((self.res, self.res), Image.BILINEAR, box=self.random_crop(*img.size))
        if random.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = (np.asarray(img, np.float32) - self.mean) * self.inv_std
        return torch.from_numpy(pixels).permute(2, 0, 1), label

    @staticmethod
    def random_crop(width: int, height: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        area = width * height
        for _ in range(10):
            target = area * random.uniform(*scale)
            aspect = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left, top = random.randint(0, width - w), random.randint(0, height - h)
                return left, top, left + w, top + h
        side = min(width, height)
        return (width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2


def mix_ms_per_batch(images: torch.Tensor, labels: torch.Tensor, mixer: BatchMixer, steps: int = 20) -> float:
    """Median milliseconds of Mixup/CutMix (as the trainer calls it) on one batch."""
    times = []
    for step in range(steps):
        start = time.perf_counter()
        mixer(images, labels, 0, step)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def cpu_seconds() -> float:
    """User + system CPU time of this process's threads so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def warm_up(batches) -> None:
    """One untimed pass (compile, fork, cache)."""
    for _ in batches(-1):
        pass


def images_per_second(batches, epochs: int, warm: bool = True) -> tuple[float, float]:
    """(images/s, this process's CPU ms per image) over `epochs` passes, after one untimed
    warm-up pass unless `warm` is False."""
    if warm:
        warm_up(batches)
    count, start, cpu = 0, time.perf_counter(), cpu_seconds()
    for epoch in range(epochs):
        for images, _ in batches(epoch):
            count += images.shape[0]
    return count / (time.perf_counter() - start), 1e3 * (cpu_seconds() - cpu) / count


def alternate(loaders: dict, epochs: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """{name: [(images/s, CPU ms per image) per round]}: the loaders timed in turn, `rounds` times."""
    for batches in loaders.values():
        warm_up(batches)
    timings = {name: [] for name in loaders}
    for _ in range(rounds):
        for name, batches in loaders.items():
            timings[name].append(images_per_second(batches, epochs, warm=False))
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", help="ImageFolder tree with train/ and val/ (default: generate JPEGs)")
    parser.add_argument("--num-images", type=int, default=2000, help="images to generate without --src")
    parser.add_argument("--sides", type=int, nargs=2, default=(300, 500), metavar=("MIN", "MAX"),
                        help="side range of generated images in px (default 300 500, ImageNet-like)")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads (FFCV) / processes (PIL)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--res", type=int, default=64, help="output side in pixels")
    parser.add_argument("--max-resolution", type=int, default=512, help="longest side stored in the .beton")
    parser.add_argument("--epochs", type=int, default=2, help="timed passes per loader")
    parser.add_argument("--rounds", type=int, default=1,
                        help="times the train loaders with and without DeiT augmentation are timed in turn")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="vsgd-bench-") as tmp:
        src = Path(args.src) if args.src else Path(tmp) / "src"
        if not args.src:
            print(f"generating {args.num_images} JPEGs in {src} ...", flush=True)
            generate_jpegs(src, args.num_images, tuple(args.sides))
        # Same JPEG bytes re-encoded (jpg), and ffcv-imagenet's recommended storage (half of
        # the images raw, so never decoded; github.com/libffcv/ffcv-imagenet write_imagenet.sh).
        storages = {"jpg": WriteSettings(max_resolution=args.max_resolution, write_mode="jpg",
                                         num_workers=args.workers),
                    "50% raw": WriteSettings(max_resolution=args.max_resolution, write_mode="proportion",
                                             compress_probability=0.5, num_workers=args.workers)}
        results, ratios = {}, {}
        for storage, settings in storages.items():
            out = Path(tmp) / storage.replace("% ", "-")
            write_image_folder(src, out, settings)
            cfg = DataConfig(data_dir=str(out), num_workers=args.workers, dtype="fp32", start_res=args.res,
                             end_res=args.res, val_res=args.res)
            train = build_train_loader(cfg, torch.device("cpu"), batch_size=args.batch_size)
            val = build_val_loader(cfg, torch.device("cpu"), batch_size=args.batch_size)
            deit = dataclasses.replace(cfg, randaugment_n=2, randaugment_m=9.0, randaugment_mstd=0.5,
                                       erase_prob=0.25, repeated_aug=3)
            deit_train = build_train_loader(deit, torch.device("cpu"), batch_size=args.batch_size)
            plain_name = f"FFCV train, {storage} (random resized crop, flip, normalize)"
            deit_name = f"FFCV train, {storage}, + DeiT augmentation"
            rounds = alternate({plain_name: lambda epoch: train_epoch(train, cfg, epoch + 1),
                                deit_name: lambda epoch: train_epoch(deit_train, deit, epoch + 1)},
                               args.epochs, args.rounds)
            for name, timings in rounds.items():
                results[name] = tuple(np.median(timings, axis=0))
            ratios[storage] = (float(np.median([d[0] / p[0] for p, d in zip(rounds[plain_name], rounds[deit_name])])),
                               float(np.median([p[1] / d[1] for p, d in zip(rounds[plain_name], rounds[deit_name])])))
            batches = train_epoch(deit_train, deit, 0)
            images, labels = (t.clone() for t in next(batches))  # a batch to time Mixup/CutMix on
            batches.close()  # stops its decoding thread
            results[f"FFCV val, {storage} (center crop 224/256, normalize)"] = images_per_second(
                lambda epoch: val, args.epochs)
            shutil.rmtree(out)
        classes = find_classes([src / "train"])
        samples = list_images(src / "train", classes)
        pil = torch.utils.data.DataLoader(PILTrainImages(samples, args.res), batch_size=args.batch_size,
                                          shuffle=True, drop_last=True, num_workers=args.workers,
                                          persistent_workers=True)
        results["PIL + torch DataLoader train (same augmentations)"] = (
            images_per_second(lambda epoch: pil, args.epochs)[0], math.nan)  # its CPU time is in worker processes

    print(f"\n{len(samples)} JPEGs ({'from ' + args.src if args.src else f'generated, {args.sides[0]}-{args.sides[1]} px'}), "
          f"output {args.res}x{args.res} fp32, batch {args.batch_size}, {args.workers} workers, "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}"
          f"{f', medians of {args.rounds} rounds' if args.rounds > 1 else ''}\n")
    print("| loader | images/s | CPU ms per image |\n|---|---:|---:|")
    for name, (rate, cpu_ms) in results.items():
        print(f"| {name} | {rate:,.0f} | {'-' if math.isnan(cpu_ms) else f'{cpu_ms:.2f}'} |")
    pil_rate = results["PIL + torch DataLoader train (same augmentations)"][0]
    for storage in storages:
        train_rate = results[f"FFCV train, {storage} (random resized crop, flip, normalize)"][0]
        rate_ratio, cpu_ratio = ratios[storage]
        print(f"\nFFCV train ({storage}) / PIL train: {train_rate / pil_rate:.1f}x; feeds "
              f"{train_rate / A100_RESNET50_IMAGES_PER_S:.2f} of one A100 on ResNet-50; with the DeiT "
              f"augmentation {rate_ratio:.2f}x the images/s ({cpu_ratio:.2f}x by CPU time per image)", end="")
    mixer = BatchMixer(len(classes), 0, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
    print(f"\n\nMixup/CutMix (0.8/1.0) of one batch of {args.batch_size} on this CPU, 1 thread: "
          f"{mix_ms_per_batch(images, labels, mixer):.1f} ms (median of 20 steps; on a GPU one pass over the batch).")
    print(f"One A100 training ResNet-50 (ffcv-imagenet, res ~160-192) consumes "
          f"~{A100_RESNET50_IMAGES_PER_S:,.0f} images/s.")
    return 0


if __name__ == "__main__":
    from results import run_recorded

    sys.exit(run_recorded("data_loading", main))
