"""Checkpoint save/load time and size per rank: ViT-B/16 (86.6M parameters), VSGD on the native
ZeRO-2 engine, written at 2 and 4 ranks, loaded at the same world size (each rank reads its
own shard) and resharded 4 -> 2 (each rank consolidates the full form, keeps its part), plus
the offline single-process `checkpoint convert` of the 4-rank checkpoint.

    OMP_NUM_THREADS=1 python bench/checkpoint_io.py [--folder /tmp/ckpt_bench]

Times are wall seconds, slowest rank; the file system is the local disk and the page cache is
warm for loads right after a save (as when a job restarts on the same node). The machine is
shared: repeat a run before trusting a difference under ~30%.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from vsgd_dist.config import RunConfig  # noqa: E402
from vsgd_dist.engines.ownership import state_bytes  # noqa: E402
from vsgd_dist.spawn import run_distributed  # noqa: E402


def make_cfg() -> RunConfig:
    cfg = RunConfig()
    cfg.model.name, cfg.optim.name, cfg.engine.name, cfg.engine.zero_stage = "vit_b16", "vsgd", "zero", 2
    return cfg


def build():
    from vsgd_dist.train.engine_setup import engine_for
    from vsgd_dist.models import build_model

    torch.manual_seed(0)
    cfg = make_cfg()
    model = build_model("vit_b16", 1000)
    return model, engine_for(model, cfg, 1e-3), cfg


def timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def save_and_load(rank, world, folder):
    """One step (hand-made gradients) so that VSGD's state exists, save, load back."""
    from vsgd_dist.train.checkpoint import Checkpointer

    model, engine, cfg = build()
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    engine.step()
    ckpt = Checkpointer(Path(folder), keep=1)
    save_s = timed(lambda: ckpt.save(engine, cfg, step=1))
    load_s = timed(lambda: ckpt.load_latest(engine, cfg))
    file = ckpt.latest() / f"rank{rank}.pt"
    return {"save_s": save_s, "load_s": load_s, "file_mib": file.stat().st_size / 2**20,
            "state_mib": state_bytes(engine.ownership()) / 2**20, "params": sum(p.numel() for p in model.parameters())}


def reshard(rank, world, folder):
    from vsgd_dist.train.checkpoint import Checkpointer

    _, engine, cfg = build()
    return {"load_s": timed(lambda: Checkpointer(Path(folder), keep=1).load_latest(engine, cfg)),
            "state_mib": state_bytes(engine.ownership()) / 2**20}


def convert_offline(folder: Path) -> float:
    from vsgd_dist.train.checkpoint import latest_checkpoint, open_checkpoint
    from vsgd_dist.train.engine_state import full_state

    start = time.perf_counter()
    meta, read = open_checkpoint(latest_checkpoint(folder))
    full = full_state(lambda r: read(r)["engine"], meta)
    sum(float(v.sum()) for s in full["optimizer"].values() for v in s.values() if torch.is_tensor(v))  # touch it
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="/tmp/checkpoint_io_bench")
    args = parser.parse_args()
    root = Path(args.folder)
    shutil.rmtree(root, ignore_errors=True)
    rows = []
    for world in (2, 4):
        results = run_distributed(save_and_load, world, str(root / f"w{world}"), timeout=1800)
        rows.append((f"save at {world}", world, max(r["save_s"] for r in results),
                     [r["file_mib"] for r in results], [r["state_mib"] for r in results]))
        rows.append((f"load at {world} (same layout)", world, max(r["load_s"] for r in results), None,
                     [r["state_mib"] for r in results]))
        params = results[0]["params"]
    results = run_distributed(reshard, 2, str(root / "w4"), timeout=1800)
    rows.append(("reshard 4 -> 2 (load)", 2, max(r["load_s"] for r in results), None,
                 [r["state_mib"] for r in results]))
    rows.append(("convert 4 ranks -> full (1 process)", 1, convert_offline(root / "w4"), None, None))
    print(f"ViT-B/16, {params / 1e6:.1f}M parameters, VSGD (mug, bg, bhg fp32) on native ZeRO-2\n")
    print("| operation | ranks | seconds (slowest rank) | file MiB per rank | optimizer state MiB per rank |")
    print("|---|---|---|---|---|")
    for name, world, seconds, files, states in rows:
        files_text = ", ".join(f"{f:.0f}" for f in files) if files else "-"
        states_text = ", ".join(f"{s:.0f}" for s in states) if states else "-"
        print(f"| {name} | {world} | {seconds:.2f} | {files_text} | {states_text} |")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    from results import run_recorded

    sys.exit(run_recorded("checkpoint_io", main))
