"""Checkpoints: resharding across world sizes and engines, crash safety, refusal of foreign
files, the offline inspect/convert commands, and exact resume through the trainer.

Engine level (a 170-parameter model, synthetic data, every rank a slice of a 12-sample global
batch): each engine writes a checkpoint after 3 steps at N ranks and goes on for 3 more; a
fresh engine at M ranks (other initial weights) loads it and takes the same 3 steps.
Tolerances (and why):
- the state right after loading, written again at M ranks and consolidated: BITWISE equal to
  the checkpoint's (resharding only moves numbers).
- the continued run against the uninterrupted one: max |difference| <= 1e-6 (parameters are
  O(0.5)). The averaged gradient is summed over M instead of N per-rank means, which rounds
  differently in the last bits (measured <= 2e-7 after 3 steps).
Trainer level (the digits demo, ZeRO-2, VSGD): resuming at the same world size repeats the
uninterrupted run's losses and final state bit for bit; resuming 2 ranks' checkpoint at 3
ranks gives the same global batches and the same weights at the resume point, but BatchNorm
normalises each rank's slice (24 vs 16 images) with its own statistics, so the losses differ
by more than rounding: rtol 5e-2 over the 6 resumed steps (measured <= 1.5e-2).
"""
from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch.__main__ import main as launch
from vsgd_dist.config import RunConfig
from vsgd_dist.spawn import RankFailed, run_distributed
from vsgd_dist.train.checkpoint import CheckpointError, file_digest, latest_checkpoint, read_full, read_meta

pytestmark = pytest.mark.dist

GLOBAL_BATCH = 12  # divisible by 1 to 4 ranks
LR = 0.05
FIRST, THEN = 3, 3
ATOL = 1e-6
# name -> (engine, ZeRO stage)
ENGINES = {"zero1": ("zero", 1), "zero2": ("zero", 2), "fsdp2": ("fsdp2", 2), "ddp": ("ddp", 2),
           "deepspeed": ("deepspeed", 2)}
OPTIMIZERS = ("vsgd", "adamw")
PAIRS = [(2, 1), (2, 3), (3, 2), (4, 2), (1, 4)]
# DeepSpeed costs seconds per process to import and start: it runs at 2 and 3 ranks only.
WITH_DEEPSPEED = {(2, 1), (2, 3), (3, 2)}
# (written by, loaded into), at 2 -> 3 ranks: every engine reads every other's checkpoints.
CROSS = [("zero2", "deepspeed", "vsgd"), ("deepspeed", "zero1", "vsgd"), ("fsdp2", "ddp", "adamw"),
         ("ddp", "zero2", "vsgd"), ("zero1", "fsdp2", "vsgd")]


def make_cfg(engine: str, opt: str) -> RunConfig:
    cfg = RunConfig()
    cfg.optim.name, cfg.optim.weight_decay = opt, 0.1
    cfg.engine.name, cfg.engine.zero_stage = ENGINES[engine]
    cfg.engine.bucket_mb = 256 / 2**20  # 64 fp32 elements: several ZeRO buckets, parameters cut across ranks
    cfg.train.global_batch, cfg.train.grad_clip = GLOBAL_BATCH, 1.0
    return cfg


def make_model(seed=0, width=7, extra_layer=False) -> nn.Module:
    """Odd shapes (170 parameters) so that shards cut tensors; FSDP2 splits 7 rows unevenly."""
    torch.manual_seed(seed)
    layers = [nn.Linear(13, width), nn.LayerNorm(width), nn.GELU(), nn.Linear(width, 5), nn.Tanh(), nn.Linear(5, 3)]
    return nn.Sequential(*layers, *([nn.Linear(3, 3)] if extra_layer else []))


def train(engine, first, steps, rank, world):
    scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lambda s: min(1.0, (first + s + 1) / 5))
    for step in range(first, first + steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(GLOBAL_BATCH, 13, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g)
        n = GLOBAL_BATCH // world
        engine.backward(((engine.wrapped(x[rank * n:(rank + 1) * n]) - y[rank * n:(rank + 1) * n]) ** 2).mean())
        engine.step()
        scheduler.step()


def full_params(model) -> list[np.ndarray]:
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().numpy().copy() for p in model.parameters()]


def engines_at(pair_or_world) -> list[str]:
    return [e for e in ENGINES if e != "deepspeed" or pair_or_world in WITH_DEEPSPEED]


# ------------------------------------------------------------------------- rank functions
def save_all(rank, world, folder, names):
    """Each engine and optimizer: FIRST steps, a checkpoint, THEN more steps (the reference)."""
    from vsgd_dist.train.engine_setup import engine_for
    from vsgd_dist.train.checkpoint import Checkpointer

    out = {}
    for name in names:
        for opt in OPTIMIZERS:
            cfg = make_cfg(name, opt)
            model = make_model()
            engine = engine_for(model, cfg, LR)
            train(engine, 0, FIRST, rank, world)
            Checkpointer(Path(folder) / f"{name}-{opt}", keep=1).save(engine, cfg, step=FIRST)
            train(engine, FIRST, THEN, rank, world)
            out[(name, opt)] = full_params(model)
    return out


def load_all(rank, world, jobs, folder_out):
    """jobs: (source folder, written-by engine, loaded-into engine, optimizer, writers' world
    size). Load into a fresh engine, write it again at this world size, continue THEN steps."""
    from vsgd_dist.train.engine_setup import engine_for
    from vsgd_dist.train.checkpoint import Checkpointer

    out = {}
    for source, written_by, name, opt, n in jobs:
        cfg = make_cfg(name, opt)
        model = make_model(seed=1)
        engine = engine_for(model, cfg, LR)
        assert Checkpointer(Path(source), keep=1).load_latest(engine, cfg)["step"] == FIRST
        again = Path(folder_out) / f"{n}-{written_by}-{name}-{opt}"
        Checkpointer(again, keep=1).save(engine, cfg, step=FIRST)
        train(engine, FIRST, THEN, rank, world)
        out[(n, written_by, name, opt)] = (full_params(model), str(again))
    return out


def mismatches(rank, world, source):
    """Load a zero2 VSGD checkpoint into runs that differ from it; return the errors."""
    from vsgd_dist.optim import OPTIMIZERS as OPTIMIZERS_BY_NAME
    from vsgd_dist.train.checkpoint import Checkpointer, load
    from vsgd_dist.train.engine_setup import engine_for

    ckpt = Checkpointer(Path(source), keep=1)
    errors = {}
    for case, cfg, model in (("optimizer name", make_cfg("zero2", "adamw"), make_model()),
                             ("shape", make_cfg("zero2", "vsgd"), make_model(width=8)),
                             ("names", make_cfg("fsdp2", "vsgd"), make_model(extra_layer=True))):
        try:
            ckpt.load_latest(engine_for(model, cfg, LR), cfg)
        except Exception as e:  # noqa: BLE001 - the message is what is tested
            errors[case] = f"{type(e).__name__}: {e}"
    meta = read_meta(ckpt.latest())
    engine = engine_for(make_model(), make_cfg("ddp", "adamw"), LR)
    try:  # the loader's own check, under the Checkpointer's name check
        load(engine, ckpt.latest(), meta, OPTIMIZERS_BY_NAME.get("adamw").optimizer_class)
    except Exception as e:  # noqa: BLE001
        errors["optimizer class"] = f"{type(e).__name__}: {e}"
    return errors


def elements_read(rank, world, source, engine_name):
    """Load a VSGD checkpoint into a fresh engine (`ENGINES` name), recording the elements of every
    global tensor this rank's reads cover: {name: elements}."""
    from torch.distributed.checkpoint.planner import LoadItemType

    from vsgd_dist.compat.torch import SafeReader
    from vsgd_dist.train.checkpoint import Checkpointer
    from vsgd_dist.train.engine_setup import engine_for

    read: dict[str, int] = {}
    plain_read_data = SafeReader.read_data

    def counting_read_data(self, plan, planner):
        for item in plan.items:
            if item.type == LoadItemType.TENSOR:
                read[item.dest_index.fqn] = read.get(item.dest_index.fqn, 0) + int(np.prod(item.lengths))
        return plain_read_data(self, plan, planner)

    SafeReader.read_data = counting_read_data
    cfg = make_cfg(engine_name, "vsgd")
    assert Checkpointer(Path(source), keep=1).load_latest(engine_for(make_model(seed=1), cfg, LR), cfg)["step"] == FIRST
    return read


def die_while_writing(file: Path) -> dict:
    """Rank 1 kills itself (SIGKILL) while DCP is writing its file; the ballast returned, saved
    with its trainer state, makes the write take a while."""
    def kill_once_writing():
        while not (file.exists() and file.stat().st_size > 0):
            time.sleep(0.0005)
        os.kill(os.getpid(), signal.SIGKILL)

    if int(os.environ["RANK"]) != 1:
        return {}
    threading.Thread(target=kill_once_writing, daemon=True).start()
    return {"ballast": torch.zeros(2**24)}


def killed_during_save(rank, world, folder):
    from vsgd_dist.train.engine_setup import engine_for
    from vsgd_dist.train.checkpoint import Checkpointer

    cfg = make_cfg("zero2", "vsgd")
    model = make_model()
    engine = engine_for(model, cfg, LR)
    ckpt = Checkpointer(Path(folder), keep=2)
    train(engine, 0, FIRST, rank, world)
    ckpt.save(engine, cfg, step=FIRST)
    if rank == 0:
        np.save(Path(folder) / "weights_at_first.npy", np.concatenate([p.ravel() for p in full_params(model)]))
    train(engine, FIRST, THEN, rank, world)
    ckpt.save(engine, cfg, step=FIRST + THEN,
              **die_while_writing(Path(folder) / f"step_{FIRST + THEN:08d}.tmp" / "__1_0.distcp"))


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{N: (folder, {(engine, opt): reference parameters})} for every writer world size."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for world in sorted({n for n, _ in PAIRS}):
        names = [e for e in ENGINES if e != "deepspeed" or any(n == world for n, _ in WITH_DEEPSPEED)]
        out[world] = (root / str(world), run_distributed(save_all, world, str(root / str(world)), names,
                                                         timeout=400)[0])
    return out


@pytest.fixture(scope="module")
def loaded(saved, tmp_path_factory):
    """{(N, M): {(written by, loaded into, opt): (parameters, folder written again at M)}}."""
    root = tmp_path_factory.mktemp("loaded")
    jobs_at = {}
    for n, m in PAIRS:
        folder = saved[n][0]
        jobs_at.setdefault(m, []).extend((str(folder / f"{e}-{o}"), e, e, o, n)
                                         for e in engines_at((n, m)) for o in OPTIMIZERS)
    jobs_at[3].extend((str(saved[2][0] / f"{src}-{opt}"), src, dst, opt, 2) for src, dst, opt in CROSS)
    out = {}
    for m, jobs in sorted(jobs_at.items()):
        result = run_distributed(load_all, m, jobs, str(root / str(m)), timeout=400)[0]
        for (n, written_by, name, opt), value in result.items():
            out.setdefault((n, m), {})[(written_by, name, opt)] = value
    return out


def assert_same_full_state(a: dict, b: dict, context):
    assert a["model"].keys() == b["model"].keys(), context
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), (context, name)
    assert a["optimizer"].keys() == b["optimizer"].keys(), context
    for name, state in a["optimizer"].items():
        assert state.keys() == b["optimizer"][name].keys(), (context, name)
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"][name][key])), (context, name, key)


def full_of(folder: Path) -> dict:
    return read_full(sorted(p for p in Path(folder).glob("step_*") if p.suffix != ".tmp")[-1])


# --------------------------------------------------------------------------- engine tests
@pytest.mark.timeout(900)
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}to{p[1]}")
def test_reshard_continues_like_the_uninterrupted_run(saved, loaded, pair):
    n, m = pair
    checked = []
    for name in engines_at(pair):
        for opt in OPTIMIZERS:
            params, again = loaded[pair][(name, name, opt)]
            reference = saved[n][1][(name, opt)]
            diff = max(float(np.abs(a - b).max()) for a, b in zip(params, reference))
            assert diff <= ATOL, (name, opt, pair, diff)
            assert_same_full_state(full_of(saved[n][0] / f"{name}-{opt}"), full_of(Path(again)), (name, opt, pair))
            checked.append((name, opt))
    assert len(checked) == 2 * len(engines_at(pair))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("written_by,loaded_into,opt", CROSS)
def test_any_engine_loads_any_engines_checkpoint(saved, loaded, written_by, loaded_into, opt):
    params, again = loaded[(2, 3)][(written_by, loaded_into, opt)]
    reference = saved[2][1][(written_by, opt)]
    diff = max(float(np.abs(a - b).max()) for a, b in zip(params, reference))
    assert diff <= ATOL, diff
    assert_same_full_state(full_of(saved[2][0] / f"{written_by}-{opt}"), full_of(Path(again)), (written_by, opt))
    assert read_meta(sorted(Path(again).glob("step_*"))[-1])["engine"] == ENGINES[loaded_into][0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("loaded_into", ["zero2", "fsdp2"])
def test_a_reshard_reads_each_element_once_across_the_ranks(saved, loaded_into):
    """2 -> 3 ranks: each rank reads only the chunks it will own, so every element of every
    sharded tensor is read by exactly one rank and no rank reads the whole checkpoint, as a
    64-rank resume needs. Sharded: the optimizer state on both engines, and the weights on
    FSDP2 (native ZeRO's model replica needs every weight on every rank)."""
    folder = saved[2][0] / "zero2-vsgd"
    per_rank = run_distributed(elements_read, 3, str(folder), loaded_into)
    sizes = {name: int(np.prod(m.size)) for name, m in metadata_of(latest_checkpoint(folder)).items()
             if hasattr(m, "size")}
    sharded = [name for name in sizes if name.startswith(("optim/",) + (("master/",) if loaded_into == "fsdp2" else ()))]
    assert len(sharded) == sum(name.startswith("master/") for name in sizes) * (4 if loaded_into == "fsdp2" else 3)
    for name in sharded:
        assert sum(rank.get(name, 0) for rank in per_rank) == sizes[name], name
    total = sum(sizes[name] for name in sharded)
    for rank in per_rank:
        assert sum(rank.get(name, 0) for name in sharded) < 0.5 * total, rank


@pytest.mark.timeout(300)
def test_mismatched_checkpoint_names_what_differs(saved):
    errors = run_distributed(mismatches, 2, str(saved[2][0] / "zero2-vsgd"), timeout=240)[0]
    assert "holds a optimizer 'vsgd' checkpoint, this run uses 'adamw'" in errors["optimizer name"]
    assert "0.weight has shape (7, 13) there, (8, 13) here" in errors["shape"]
    assert "missing ['6.bias', '6.weight']" in errors["names"]
    assert ("CheckpointMismatch: checkpoint holds vsgd_dist.optim.vsgd.VSGD state, this run's optimizer is "
            "torch.optim.adamw.AdamW") in errors["optimizer class"]


@pytest.mark.timeout(300)
def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    with pytest.raises(RankFailed):  # rank 1 killed; rank 0 sees its peer gone, or is killed by the harness
        run_distributed(killed_during_save, 2, str(tmp_path), timeout=240)
    assert (tmp_path / f"step_{FIRST + THEN:08d}.tmp" / "__1_0.distcp").is_file()  # the interrupted write
    assert not (tmp_path / f"step_{FIRST + THEN:08d}").exists()
    assert launch(["checkpoint", "convert", str(tmp_path), "--out", str(tmp_path / "c.pt")]) == 0
    converted = torch.load(tmp_path / "c.pt", weights_only=True)
    assert converted["step"] == FIRST
    weights = np.concatenate([converted["model"][n].numpy().ravel() for n in make_model().state_dict()])
    assert np.array_equal(weights, np.load(tmp_path / "weights_at_first.npy"))


def test_tampered_file_is_refused_without_running_it(saved, tmp_path, capsys):
    folder = tmp_path / "step_00000003"
    shutil.copytree(sorted((saved[2][0] / "zero2-vsgd").glob("step_*"))[-1], folder)
    marker = tmp_path / "code-ran"
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCodeWhenUnpickled(marker)))
    with pytest.raises(CheckpointError, match=".metadata does not match the checksum meta.json recorded"):
        read_full(folder)
    # whoever can write the file can write meta.json too: the unpickler still refuses the code
    meta = json.loads((folder / "meta.json").read_text())
    meta["sha256"][".metadata"] = file_digest(folder / ".metadata")
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="holds objects other than tensors and containers.*tampered"):
        read_full(folder)
    assert launch(["checkpoint", "convert", str(folder), "--out", str(tmp_path / "c.pt")]) == 2
    err = capsys.readouterr().err
    assert ".metadata holds objects other than tensors" in err and len(err.strip().splitlines()) == 1, err
    assert not marker.exists() and not (tmp_path / "c.pt").exists()


def test_inspect_and_convert_refuse_folders_without_a_finished_checkpoint(saved, tmp_path, capsys):
    assert launch(["checkpoint", "inspect", str(tmp_path)]) == 2
    assert "holds no checkpoints" in capsys.readouterr().err
    shutil.copytree(sorted((saved[2][0] / "zero2-vsgd").glob("step_*"))[-1],
                    tmp_path / "checkpoints" / "step_00000009.tmp")
    assert launch(["checkpoint", "convert", str(tmp_path), "--out", str(tmp_path / "c.pt")]) == 2
    err = capsys.readouterr().err
    assert "only unfinished checkpoints (step_00000009.tmp" in err and len(err.strip().splitlines()) == 1, err
    published = tmp_path / "checkpoints" / "step_00000003"
    shutil.copytree(tmp_path / "checkpoints" / "step_00000009.tmp", published)
    (published / "__1_0.distcp").unlink()
    assert launch(["checkpoint", "inspect", str(tmp_path)]) == 2
    assert "lacks __1_0.distcp of its 3 files" in capsys.readouterr().err


def test_convert_keeps_each_optimizers_own_state_names(saved, tmp_path):
    for opt, keys in (("vsgd", {"mug", "bg", "bhg", "step"}), ("adamw", {"exp_avg", "exp_avg_sq", "step"})):
        for engine in ("zero1", "fsdp2", "ddp", "deepspeed"):
            out = tmp_path / f"{engine}-{opt}.pt"
            assert launch(["checkpoint", "convert", str(saved[2][0] / f"{engine}-{opt}"), "--out", str(out)]) == 0
            converted = torch.load(out, weights_only=True)
            assert converted["step"] == FIRST and set(converted["model"]) == set(make_model().state_dict())
            for name, state in converted["optimizer"].items():
                assert set(state) == keys, (engine, opt, name)
                assert state[keys.difference({"step"}).pop()].shape == converted["model"][name].shape


# -------------------------------------------------------------------------- trainer tests
DEMO = ["recipes/demo.yaml", "train.progress=false", "train.log_every=1", "max_steps=12",
        "train.global_batch=48", "train.ckpt_every=0"]


def train_run(out, *overrides, nproc=2):
    return launch(["run", *DEMO, "--nproc", str(nproc), f"out={out}", *overrides])


def losses(run_dir) -> dict[int, float]:
    acc = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    """Uninterrupted at 2 ranks; stopped at step 6 at 2 ranks (kept as `stopped2`), then
    resumed at 2 and at 3; `resharded3`: 3 ranks load the step-6 checkpoint and save it again
    at once (max_steps=6), the state right after the reshard."""
    root = tmp_path_factory.mktemp("trainer")
    assert train_run(root / "whole") == 0
    assert train_run(root / "resumed2", "train.stop_at=6") == 0
    for copy in ("stopped2", "resumed3", "resharded3"):
        shutil.copytree(root / "resumed2", root / copy)
    assert train_run(root / "resumed2") == 0
    assert train_run(root / "resumed3", nproc=3) == 0
    assert train_run(root / "resharded3", "max_steps=6", nproc=3) == 0
    return root


@pytest.mark.timeout(900)
def test_trainer_resume_at_the_same_world_size_is_bitwise(trainer_runs):
    whole, resumed = losses(trainer_runs / "whole"), losses(trainer_runs / "resumed2")
    assert sorted(whole) == list(range(1, 13)) and sorted(resumed) == list(range(1, 13))
    assert [resumed[s] for s in range(7, 13)] == [whole[s] for s in range(7, 13)]
    assert_same_full_state(full_of(trainer_runs / "whole" / "checkpoints"),
                           full_of(trainer_runs / "resumed2" / "checkpoints"), "same world size")


@pytest.mark.timeout(900)
def test_trainer_resumes_two_ranks_checkpoint_at_three(trainer_runs):
    """The reshard itself is exact: what 3 ranks load from the 2-rank checkpoint and save again
    is that checkpoint's state bit for bit. The steps after it are not compared with the 2-rank
    run: 3 ranks sum the gradient in another order, and training amplifies that last-bit
    difference by a machine-dependent amount (engine tests compare them on exact sums)."""
    whole, resumed = losses(trainer_runs / "whole"), losses(trainer_runs / "resumed3")
    assert [resumed[s] for s in range(1, 7)] == [whole[s] for s in range(1, 7)]  # written by the 2-rank part
    assert sorted(resumed) == list(range(1, 13)) and all(math.isfinite(resumed[s]) for s in range(7, 13))
    meta = read_meta(sorted((trainer_runs / "resumed3" / "checkpoints").glob("step_*"))[-1])
    assert meta["step"] == 12 and meta["world_size"] == 3
    resharded = read_meta(sorted((trainer_runs / "resharded3" / "checkpoints").glob("step_*"))[-1])
    assert resharded["step"] == 6 and resharded["world_size"] == 3
    assert_same_full_state(full_of(trainer_runs / "stopped2" / "checkpoints"),
                           full_of(trainer_runs / "resharded3" / "checkpoints"), "2 ranks -> 3 ranks")


@pytest.mark.timeout(900)
def test_inspect_and_convert_a_real_run(trainer_runs, tmp_path, capsys):
    run_dir = trainer_runs / "whole"
    assert launch(["checkpoint", "inspect", str(run_dir)]) == 0
    text = capsys.readouterr().out
    for line in ("step        12", "world size  2", "engine      zero (stage 2)",
                 "optimizer   vsgd (vsgd_dist.optim.vsgd.VSGD)", "model       resnet_tiny"):
        assert line in text, text
    rank_lines = text.split("optimizer state MiB\n")[1].strip().splitlines()
    assert [line.split()[0] for line in rank_lines] == ["0", "1"]

    out = tmp_path / "consolidated.pt"
    assert launch(["checkpoint", "convert", str(run_dir), "--out", str(out)]) == 0
    converted = torch.load(out, weights_only=True)
    assert converted["step"] == 12
    path = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    items = stored_items(path)
    for fqn, tensor in items.items():
        if fqn[0].startswith("model/"):
            assert torch.equal(converted["model"][fqn[0].removeprefix("model/")], tensor), fqn
    # Every chunk a rank wrote, read from its file as DCP stored it, equals the converted tensors.
    covered = {name: 0 for name in converted["optimizer"]}
    for (fqn, first), chunk in items.items():
        if fqn.startswith("optim/") and fqn.endswith("/mug"):
            name = fqn.split("/")[1]
            last = first + chunk.numel()
            for key in ("mug", "bg", "bhg"):
                assert torch.equal(converted["optimizer"][name][key].reshape(-1)[first:last],
                                   items[(f"optim/{name}/{key}", first)])
            assert int(converted["optimizer"][name]["step"]) == 12
            covered[name] += last - first
    assert covered == {n: converted["model"][n].numel() for n in covered}


def metadata_of(path: Path) -> dict:
    """{fqn: DCP's storage metadata} of a checkpoint folder."""
    from vsgd_dist.compat.torch import MetadataUnpickler

    with open(path / ".metadata", "rb") as f:
        return MetadataUnpickler(f).load().state_dict_metadata


def stored_items(path: Path) -> dict:
    """{(fqn, first element): tensor} of every tensor chunk in a checkpoint's files, read with
    plain torch.load from where DCP's metadata says each lies."""
    import io

    from vsgd_dist.compat.torch import MetadataUnpickler

    with open(path / ".metadata", "rb") as f:
        metadata = MetadataUnpickler(f).load()
    items = {}
    for index, where in metadata.storage_data.items():
        if index.offset is None:
            continue  # a value, not a tensor
        with open(path / where.relative_path, "rb") as f:
            f.seek(where.offset)
            data = f.read(where.length)
        items[(index.fqn, index.offset[0] if len(index.offset) else 0)] = torch.load(io.BytesIO(data),
                                                                                    weights_only=True)
    return items


# ------------------------------------------------------------------ background saves, ecosystem
def background_saves(rank, world, folder):
    """zero2 VSGD at 2 ranks saving in the background: step 3 (published by the next save's
    wait), step 6 whose write fails (a full disk), step 9 (published by the final wait);
    beside it the same states saved synchronously."""
    import contextlib
    import io

    from vsgd_dist.train.checkpoint import Checkpointer
    from vsgd_dist.train.engine_setup import engine_for

    class FullDiskAtStep6(Checkpointer):
        def _storage_writer(self, tmp):
            writer = super()._storage_writer(tmp)
            if tmp.name.startswith("step_00000006"):
                def write_data(plan, planner):
                    raise OSError(28, "No space left on device")
                writer.write_data = write_data
            return writer

    cfg = make_cfg("zero2", "vsgd")
    engine = engine_for(make_model(), cfg, LR)
    background = FullDiskAtStep6(Path(folder) / "background", keep=3, background=True)
    sync = Checkpointer(Path(folder) / "sync", keep=3)
    seen, err = {}, io.StringIO()
    train(engine, 0, 3, rank, world)
    with contextlib.redirect_stderr(err):
        for step in (3, 6, 9):
            sync.save(engine, cfg, step=step)
            background.save(engine, cfg, step=step)
            seen[step] = background.latest()  # before this save's wait: the one before it
            train(engine, step, 3, rank, world)  # training goes on while it writes
        background.wait()
    return {"seen": {s: p and p.name for s, p in seen.items()}, "err": err.getvalue(),
            "published": sorted(p.name for p in (Path(folder) / "background").glob("step_*"))}


@pytest.mark.timeout(300)
def test_background_saves_publish_after_writing_and_keep_the_previous_on_failure(tmp_path):
    result = run_distributed(background_saves, 2, str(tmp_path), timeout=240)[0]
    # nothing is published before its write completed: each save sees the one before it
    assert result["seen"] == {3: None, 6: "step_00000003", 9: "step_00000003"}, result
    assert "background save of step 6 failed (No space left on device)" in result["err"], result["err"]
    assert "step_00000003" in result["err"]  # the resume point it keeps
    assert result["published"] == ["step_00000003", "step_00000009"], result
    for step in (3, 9):  # what training went on from while it wrote: the saved state, bit for bit
        assert_same_full_state(read_full(tmp_path / "sync" / f"step_{step:08d}"),
                               read_full(tmp_path / "background" / f"step_{step:08d}"), step)


@pytest.mark.timeout(300)
def test_torch_consolidates_our_checkpoint_into_one_file(tmp_path):
    """DCP's own tool reads the folder: every parameter's 1-D tensor, buffers and values."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run_distributed(save_all, 2, str(tmp_path), ["zero2"], timeout=240)
    folder = sorted((tmp_path / "zero2-vsgd").glob("step_*"))[-1]
    dcp_to_torch_save(folder, tmp_path / "one.pt")
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    full = read_full(folder)
    for name, weight in full["model"].items():
        assert torch.equal(one[f"master/{name}"], weight.reshape(-1)), name
    for name, state in full["optimizer"].items():
        assert torch.equal(one[f"optim/{name}/mug"], state["mug"].reshape(-1)), name
        assert int(one[f"counters/{name}"]["step"]) == FIRST
    assert one["trainer/rank1"]["step"] == FIRST


def save_torchvision_weights(rank, world, folder, name):
    from vsgd_dist.models import build_model
    from vsgd_dist.train.checkpoint import Checkpointer
    from vsgd_dist.train.engine_setup import engine_for

    cfg = make_cfg("ddp", "adamw")
    cfg.model.name = name
    Checkpointer(Path(folder), keep=1).save(engine_for(build_model(name, 1000), cfg, LR), cfg, step=0)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("model,torchvision_model", [("resnet50", "resnet50"), ("vit_b16", "vit_b_16")])
def test_convert_gives_a_state_dict_torchvision_loads_strictly(tmp_path, model, torchvision_model):
    from vsgd_dist.compat.torchvision import import_torchvision

    torchvision = import_torchvision()
    run_distributed(save_torchvision_weights, 1, str(tmp_path / "run"), model, timeout=500)
    assert launch(["checkpoint", "convert", str(tmp_path / "run"), "--out", str(tmp_path / "c.pt")]) == 0
    converted = torch.load(tmp_path / "c.pt", weights_only=True)["model"]
    reference = getattr(torchvision.models, torchvision_model)()
    reference.load_state_dict(converted, strict=True)
    assert all(torch.equal(v, converted[k]) for k, v in reference.state_dict().items())


def test_old_per_rank_checkpoints_are_refused_then_upgraded(tmp_path, capsys):
    """A checkpoint of the earlier format (rank<r>.pt files written by 2 zero2 ranks, built
    here from the state of a DCP one) is refused with the command that upgrades it, which
    rewrites it in place, state unchanged."""
    old = tmp_path / "checkpoints" / "step_00000003"
    run_distributed(write_old_format, 2, str(old), timeout=240)
    assert launch(["checkpoint", "inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{old} is in the old per-rank format; convert it with `python -m launch checkpoint upgrade {old}`" in err
    assert len(err.strip().splitlines()) == 1, err
    assert launch(["checkpoint", "upgrade", str(tmp_path)]) == 0
    upgraded = read_full(old)
    reference = read_full(sorted((tmp_path / "reference").glob("step_*"))[-1])
    assert_same_full_state(reference, upgraded, "upgraded")
    assert upgraded["trainer"][1]["step"] == FIRST and not (old / "rank0.pt").exists()


def write_old_format(rank, world, folder):
    """What the earlier per-rank format held for a zero2 run: each rank's ZeroOptimizer shard
    and rank 0's model, in rank<r>.pt, with meta.json's checksums."""
    from vsgd_dist.train.checkpoint import Checkpointer, file_digest
    from vsgd_dist.train.engine_setup import engine_for

    cfg = make_cfg("zero2", "vsgd")
    model = make_model()
    engine = engine_for(model, cfg, LR)
    train(engine, 0, FIRST, rank, world)
    Checkpointer(Path(folder).parents[1] / "reference", keep=1).save(engine, cfg, step=FIRST)
    payload = {"optimizer": engine.optimizer.state_dict()}
    if rank == 0:
        payload["model"] = engine.model.state_dict()
    Path(folder).mkdir(parents=True, exist_ok=True)
    torch.save({"engine": payload, "trainer": {"step": FIRST, "rank": rank}}, Path(folder) / f"rank{rank}.pt")
    torch.distributed.barrier()
    if rank == 0:
        meta = {"step": FIRST, "world_size": 2, "engine": "zero", "zero_stage": 2, "optimizer": "vsgd",
                "optimizer_class": "vsgd_dist.optim.vsgd.VSGD", "model": "resnet_tiny",
                "state_bytes_per_rank": [0, 0],
                "sha256": {f"rank{r}.pt": file_digest(Path(folder) / f"rank{r}.pt") for r in range(2)}}
        (Path(folder) / "meta.json").write_text(json.dumps(meta))
