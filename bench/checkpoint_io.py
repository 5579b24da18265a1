"""Checkpoint cost for ResNet-50 and ViT-B/16 state (VSGD: fp32 weights and mug, bg, bhg, on
the native ZeRO-2 engine) at 2 ranks: the training stall per save, synchronous and in the
background (`train.async_checkpoint`: the time until `save()` returns and training goes on),
the resume time at the same layout and resharded 2 -> 3, and the peak resident memory (RSS) of
a rank during that reshard.

    OMP_NUM_THREADS=1 python bench/checkpoint_io.py [--folder /tmp/ckpt_bench] [--models resnet50,vit_b16]

Times are wall seconds, slowest rank; the file system is the local disk and the page cache is
warm for loads right after a save (as when a job restarts on the same node). A code base
without background saves shows "-" there. The machine is shared: repeat a run before trusting
a difference under ~30%.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from vsgd_dist.config import RunConfig  # noqa: E402
from vsgd_dist.spawn import run_distributed  # noqa: E402


def make_cfg(model: str) -> RunConfig:
    cfg = RunConfig()
    cfg.model.name, cfg.optim.name, cfg.engine.name, cfg.engine.zero_stage = model, "vsgd", "zero", 2
    return cfg


def build(model_name: str):
    """The model and engine after one step (hand-made gradients), so that VSGD's state exists."""
    from vsgd_dist.models import build_model
    from vsgd_dist.train.engine_setup import engine_for

    torch.manual_seed(0)
    cfg = make_cfg(model_name)
    model = build_model(model_name, 1000)
    engine = engine_for(model, cfg, 1e-3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    engine.step()
    return model, engine, cfg


def checkpointer(folder: Path, background: bool):
    """A Checkpointer, or None when this code base has no background saves."""
    from vsgd_dist.train.checkpoint import Checkpointer

    if not background:
        return Checkpointer(folder, keep=1)
    try:
        return Checkpointer(folder, keep=1, background=True)
    except TypeError:
        return None


def timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def save_and_resume(rank, world, folder, model_name):
    _, engine, cfg = build(model_name)
    sync = checkpointer(Path(folder) / "sync", background=False)
    out = {"params": sum(p.numel() for p in engine.model.parameters()),
           "sync_stall_s": timed(lambda: sync.save(engine, cfg, step=1))}
    background = checkpointer(Path(folder) / "background", background=True)
    if background is not None:
        out["async_stall_s"] = timed(lambda: background.save(engine, cfg, step=1))
        out["async_write_s"] = timed(background.wait)
    out["resume_s"] = timed(lambda: sync.load_latest(engine, cfg))
    return out


def reshard(rank, world, folder, model_name):
    _, engine, cfg = build(model_name)
    peak = [rss_mib()]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    seconds = timed(lambda: checkpointer(Path(folder) / "sync", background=False).load_latest(engine, cfg))
    done.set()
    sampler.join()
    return {"resume_s": seconds, "peak_rss_mib": max(peak[0], rss_mib())}


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="/tmp/checkpoint_io_bench")
    parser.add_argument("--models", default="resnet50,vit_b16")
    args = parser.parse_args()
    root = Path(args.folder)
    print("| model | parameters | save stall, sync (s) | save stall, background (s) | background write (s) "
          "| resume 2 -> 2 (s) | resume 2 -> 3 (s) | peak RSS per rank, 2 -> 3 (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for model_name in args.models.split(","):
        shutil.rmtree(root, ignore_errors=True)
        saved = run_distributed(save_and_resume, 2, str(root), model_name, timeout=1800)
        loaded = run_distributed(reshard, 3, str(root), model_name, timeout=1800)

        def slowest(results, key):
            values = [r[key] for r in results if key in r]
            return f"{max(values):.2f}" if values else "-"

        print(f"| {model_name} | {saved[0]['params'] / 1e6:.1f}M | {slowest(saved, 'sync_stall_s')} "
              f"| {slowest(saved, 'async_stall_s')} | {slowest(saved, 'async_write_s')} "
              f"| {slowest(saved, 'resume_s')} | {slowest(loaded, 'resume_s')} "
              f"| {max(r['peak_rss_mib'] for r in loaded):.0f} |", flush=True)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    from results import run_recorded

    sys.exit(run_recorded("checkpoint_io", main))
