"""`python -m launch compare RUN_DIR... [--out DIR]`: VSGD vs AdamW from TensorBoard logs."""
from __future__ import annotations

import sys


def add_arguments(parser, name):
    parser.add_argument("runs", nargs="+", help="run folders, or folders holding runs (a sweep)")
    parser.add_argument("--out", default=None, help="where report.md and the PNGs go (default: "
                                                    "<first run's parent>/compare)")


def main(args) -> int:
    from pathlib import Path

    from vsgd_dist.report import compare

    out = args.out or str(Path(args.runs[0]).resolve().parent / "compare")
    try:
        markdown = compare(args.runs, out)
    except FileNotFoundError as e:
        print(f"launch compare: {e}", file=sys.stderr)
        return 2
    print(markdown, end="")
    print(f"\nreport: {Path(out) / 'report.md'}")
    return 0
