"""`python -m launch data write`: ImageNet-style folder -> train.beton, val.beton, manifest.json."""
from __future__ import annotations

import argparse
import os
import sys

from launch.paths import PathProblem, check_folder


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    write = sub.add_parser("write", help="write an ImageFolder tree (train/, val/) to FFCV .beton files",
                           description="Write SRC/{train,val}/<class>/<image> to OUT/{train,val}.beton "
                                       "and OUT/manifest.json (class index = sorted class folder names).")
    write.add_argument("--src", required=True, help="folder holding train/ and/or val/")
    write.add_argument("--out", required=True, help="output folder (created; refused if it holds another dataset)")
    write.add_argument("--max-resolution", type=int, default=512, help="longest image side stored (default 512)")
    write.add_argument("--write-mode", choices=("jpg", "proportion", "raw", "smart"), default="proportion",
                       help="jpg, raw, proportion (JPEG with --compress-probability) or smart "
                            "(JPEG above --smart-threshold bytes) (default proportion)")
    write.add_argument("--compress-probability", type=float, default=0.5,
                       help="share of JPEG images in proportion mode (default 0.5)")
    write.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1-100 (default 90)")
    write.add_argument("--smart-threshold", type=int, default=256 * 256 * 3,
                       help="smart mode: raw bytes above which an image is JPEG (default 196608)")
    write.add_argument("--chunk-size", type=int, default=100, help="images per worker task (default 100)")
    write.add_argument("--num-workers", type=int, default=os.cpu_count() or 1,
                       help="writer processes (default: all cores)")
    write.add_argument("--overwrite", action="store_true", help="replace a different dataset in --out")


def main(args: argparse.Namespace) -> int:
    from vsgd_dist.data import DataError, WriteSettings, write_image_folder

    try:
        check_folder(args.out, "--out")
        settings = WriteSettings(max_resolution=args.max_resolution, write_mode=args.write_mode,
                                 compress_probability=args.compress_probability,
                                 jpeg_quality=args.jpeg_quality, smart_threshold=args.smart_threshold,
                                 chunk_size=args.chunk_size, num_workers=args.num_workers)
        manifest = write_image_folder(args.src, args.out, settings, overwrite=args.overwrite)
    except (DataError, PathProblem) as e:
        print(f"python -m launch data write: error: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{split} {n}" for split, n in manifest.counts.items())
    print(f"wrote {args.out}: {len(manifest.classes)} classes, {counts} images")
    return 0
