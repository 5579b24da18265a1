"""Benchmark results as files: each bench script's table goes to results/<bench>.md under a
header naming the machine it was measured on, so that a number is never read without its
machine and date, and re-measuring means rerunning the script."""
from __future__ import annotations

import datetime
import io
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Callable

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_lines() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return ["none visible"]
    return [f"{torch.cuda.get_device_name(i)}, {torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB"
            for i in range(torch.cuda.device_count())]


def machine_header(bench_name: str) -> str:
    """Markdown lines: what ran, where, when, and how busy the machine was when it ended."""
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS_DIR.parent, capture_output=True,
                            text=True).stdout.strip()
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA build"
    if torch.cuda.is_available():
        cuda += f", cuDNN {torch.backends.cudnn.version()}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}"
    rows = [
        ("command", f"`python bench/{bench_name}.py {' '.join(sys.argv[1:])}`".replace(" `", "`")),
        ("date (UTC)", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")),
        ("CPU", f"{cpu_model()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable here)"),
        ("GPU", "; ".join(gpu_lines())),
        ("software", f"Python {platform.python_version()}, torch {torch.__version__}, {cuda}"),
        ("load average at the end", " / ".join(f"{x:.1f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"),
        ("commit", commit or "unknown"),
    ]
    return "\n".join([f"# {bench_name}", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def write_results(bench_name: str, markdown: str, results_dir: Path = RESULTS_DIR, *, variant: str = "") -> Path:
    """Write results/<bench_name>.md (results/<bench_name>_<variant>.md for a mode of the script
    whose tables must not replace its main ones): the machine header, then `markdown`."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{bench_name}{'_' + variant if variant else ''}.md"
    path.write_text(f"{machine_header(bench_name)}\n\n{markdown.strip()}\n")
    return path


class _Tee(io.TextIOBase):
    def __init__(self, stream):
        self.stream, self.captured = stream, io.StringIO()

    def write(self, text):
        self.captured.write(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


def run_recorded(bench_name: str, main: Callable[[], int | None], record: bool = True, variant: str = "") -> int | None:
    """Run a bench script's `main`, printing as usual, and write what it printed with
    `write_results` unless it raised or printed nothing (e.g. no GPU visible)."""
    if not record:
        return main()
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    try:
        code = main()
    finally:
        sys.stdout = tee.stream
    if tee.captured.getvalue().strip():
        print(f"\nresults: {write_results(bench_name, tee.captured.getvalue(), variant=variant)}")
    return code
