"""`python -m launch compare RUN_DIR... [--out DIR]`: the optimizers side by side (accuracy,
NLL, calibration, IVON's posterior predictive, throughput) from TensorBoard logs.

Runs that logged a minival split (data.minival) also get the tuned comparison first: each
optimizer's point chosen on minival, its val top-1 over seeds with 95% intervals and the
paired difference to --baseline (vsgd_dist.report.tuned_comparison)."""
from __future__ import annotations

import sys

from launch.paths import check_folder


def add_arguments(parser, name):
    parser.add_argument("runs", nargs="+", help="run folders, or folders holding runs (a sweep)")
    parser.add_argument("--out", default=None, help="where report.md and the PNGs go (default: "
                                                    "<first run's parent>/compare)")
    parser.add_argument("--baseline", default="adamw", help="optimizer the tuned comparison pairs the others "
                                                            "with (default adamw)")


def main(args) -> int:
    from pathlib import Path

    from vsgd_dist.report import compare, tuned_comparison

    out = args.out or str(Path(args.runs[0]).resolve().parent / "compare")
    try:
        check_folder(out, "--out")
        markdown = compare(args.runs, out)
        tuned = tuned_comparison(args.runs, out, args.baseline)
    except (FileNotFoundError, ValueError) as e:  # PathProblem is a ValueError
        print(f"launch compare: {e}", file=sys.stderr)
        return 2
    if tuned:
        markdown = f"{tuned}\n## Every run\n\n{markdown}"
        (Path(out) / "report.md").write_text(markdown)
    print(markdown, end="")
    print(f"\nreport: {Path(out) / 'report.md'}")
    return 0
