"""engine.shard_within=node (hierarchical sharding: ZeRO inside each node, HSDP for FSDP2) on
real gloo ranks numbered as nodes (`run_distributed(..., ranks_per_node=2)`: 4 ranks = 2 nodes
x 2), against the unsharded optimizer and the flat (world) layout; checkpoints across layouts
and world sizes; the layouts that are refused.

Tolerances (and why):
- optimizer level, BITWISE: every rank's gradient is a small integer times 2**-6 (ZeRO, through
  the backward hooks) so the reduce-scatter inside the node and the all-reduce across nodes sum
  it exactly, as the reference does; FSDP2 is handed the averaged gradient as DTensors on its
  (replicate, shard) mesh. The update is elementwise, so nothing may differ.
- global gradient norm and diagnostics, rtol 1e-5: summed per shard, then over the node's ranks.
- end to end (each rank a slice of a batch of 12, 20 steps): node against world, max |difference|
  <= 1e-5 (parameters are O(0.5); measured with VSGD 8.6e-7 on zero stage 2 and 7.7e-7 on
  fsdp2, with AdamW 6e-8 and 1.2e-7). The average gradient is summed in another order (the
  node's two ranks, then the two nodes' sums, against the world's reduction), which rounds
  differently in the last bit, and the Adam-like updates carry that on. zero stage 1 is
  bitwise equal (DDP all-reduces over the world in both layouts). Against the full-batch
  reference rtol/atol 1e-4 as in test_zero.py.
- checkpoints: a checkpoint written by one layout and loaded by another, written again and
  consolidated, is BITWISE the original full form; the continued run is within 1e-6 of the
  writer's own continuation (the reduction order changes with the layout, as in
  test_checkpoint.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributed.tensor import distribute_tensor

from vsgd_dist.config import ConfigError, RunConfig, load_recipe
from vsgd_dist.distributed import NodeLayoutError, gather_host_objects, node_mesh, ranks_per_node
from vsgd_dist.engines.ownership import state_bytes, state_pieces
from vsgd_dist.optim import named_param_groups
from vsgd_dist.optim.diagnostics import reduced_diagnostics
from vsgd_dist.optim.vsgd_diagnostics import DIAGNOSTICS, diagnostic_sums
from vsgd_dist.spawn import run_distributed
from vsgd_dist.train.checkpoint import Checkpointer, read_full
from vsgd_dist.train.engine_setup import engine_for, engine_setup

REPO = Path(__file__).resolve().parents[1]
STEPS = 20
BATCH = 12
LR = {"vsgd": 0.05, "adamw": 0.01}
WEIGHT_DECAY = 0.1
NODE_VS_WORLD_ATOL = 1e-5
CKPT_ATOL = 1e-6
FIRST, THEN = 3, 3


def make_model(seed: int = 0) -> nn.Sequential:
    """170 parameters in odd shapes: ZeRO buckets and FSDP2 rows are cut unevenly."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 7), nn.LayerNorm(7), nn.GELU(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))


def make_cfg(engine: str, within: str, opt: str = "vsgd", stage: int = 2) -> RunConfig:
    """VSGD fused, as the recipes run it; AdamW unfused (torch's fused AdamW rounds 1 ulp
    differently where FSDP2 cuts a tensor, see test_ddp_fsdp2.py)."""
    cfg = RunConfig()
    cfg.optim.name, cfg.optim.weight_decay, cfg.optim.fused = opt, WEIGHT_DECAY, None if opt == "vsgd" else False
    cfg.engine.name, cfg.engine.zero_stage, cfg.engine.shard_within = engine, stage, within
    cfg.engine.bucket_mb = 256 / 2**20  # 64 fp32 elements: several buckets, each padded differently
    cfg.train.global_batch = BATCH
    return cfg


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach()


def exact_grads(shapes, step: int, rank: int) -> list[torch.Tensor]:
    """Integers times 2**-6: sums over ranks are exact in any order."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randint(-64, 65, s, generator=g).float() * 2.0**-6 for s in shapes]


def train(engine, first: int, steps: int, rank: int, world: int) -> None:
    """Each rank a slice of a seeded batch of BATCH (the same batches at any world size)."""
    for step in range(first, first + steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(BATCH, 13, generator=g), torch.randn(BATCH, 3, generator=g)
        mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        engine.backward(nn.functional.mse_loss(engine.wrapped(x[mine]), y[mine]))
        engine.step()


# ---- the node layout against the unsharded optimizer and the world layout -----------------
def check_optimizer_bitwise(rank, world, engine_name, opt):
    cfg = make_cfg(engine_name, "node", opt)
    engine = engine_for(make_model(), cfg, LR[opt])
    reference = make_model()
    setup = engine_setup(cfg, LR[opt])
    ref_opt = setup.optimizer.optimizer_class(named_param_groups(reference, WEIGHT_DECAY), **setup.optimizer_kwargs())
    params, refs = list(engine.model.parameters()), list(reference.parameters())
    for step in range(STEPS):
        per_rank = [exact_grads([p.shape for p in refs], step, r) for r in range(world)]
        for ref, *grads in zip(refs, *per_rank):
            ref.grad = sum(grads) / world
        if engine_name == "zero":  # the hooks reduce-scatter inside the node, then all-reduce across
            engine.backward(sum((p * g).sum() for p, g in zip(params, per_rank[rank])))
        else:
            for p, ref in zip(params, refs):
                p.grad = distribute_tensor(ref.grad, p.device_mesh, p.placements)
        norm = engine.step()
        ref_norm = torch.nn.utils.clip_grad_norm_(refs, float("inf"))
        ref_opt.step()
        ref_opt.zero_grad()
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
    for p, ref in zip(params, refs):
        assert torch.equal(full(p), ref.detach()), (engine_name, opt)
    check_state_split(engine, ref_opt, world)
    if opt == "vsgd":
        check_diagnostics(engine, reference, ref_opt)


def check_state_split(engine, ref_opt, world):
    """Each rank holds 1/(ranks per node) of the state (ZeRO: plus bucket padding); each node
    holds all of it, the same split as every other node."""
    per_rank = gather_host_objects(state_bytes(engine.ownership()))
    unsharded = sum(v.nbytes for s in ref_opt.state.values() for v in s.values() if v.dim() > 0)
    assert per_rank[:2] == per_rank[2:], per_rank
    assert sum(per_rank[:2]) >= unsharded
    from vsgd_dist.sharding import ZeroOptimizer

    if isinstance(engine.optimizer, ZeroOptimizer):  # native ZeRO
        opt = engine.optimizer
        assert opt.world_size == 2 and opt.replicas == world // 2
        padding = sum(b.padded_numel - b.numel for b in opt.buckets)
        bytes_per_element = unsharded // sum(p.numel() for p in engine.model.parameters())
        assert per_rank[0] == per_rank[1] and 2 * per_rank[0] == unsharded + padding * bytes_per_element
    else:
        assert sum(per_rank[:2]) == unsharded


def check_diagnostics(engine, reference, ref_opt):
    """Summed over the node's ranks only (the shard group): the unsharded optimizer's means."""
    layer_of = {name: name.split(".")[0] for name, _ in reference.named_parameters()}
    own = engine.ownership()
    sharded, _ = reduced_diagnostics(DIAGNOSTICS, state_pieces(own, DIAGNOSTICS.state_keys), layer_of.get,
                                     reduce=True, device=torch.device("cpu"), process_group=own.shard_group)
    group = ref_opt.param_groups[0]
    hp = {"lr": group["lr"], **{k: group[k] for k in ("eps", "ps", "ghattg")}}
    assert sharded.keys() == set(layer_of.values())
    for layer in sharded:
        row = sum(diagnostic_sums(ref_opt.state[p]["mug"], ref_opt.state[p]["bg"], ref_opt.state[p]["bhg"],
                                  **hp).double() for n, p in reference.named_parameters() if layer_of[n] == layer)
        expected = torch.tensor([row[0].item()] + (row[1:] / row[0]).tolist(), dtype=torch.float64)
        got = torch.tensor([sharded[layer][k] for k in ("count", "snr", "posterior_std", "implied_beta1",
                                                         "effective_step")], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def node_against_world(rank, world, engine_name, opt, stage):
    """Both layouts and the full-batch reference on the same batches; max |node - world|."""
    engines = {within: engine_for(make_model(), make_cfg(engine_name, within, opt, stage), LR[opt])
               for within in ("world", "node")}
    reference = make_model()
    setup = engine_setup(make_cfg(engine_name, "world", opt, stage), LR[opt])
    ref_opt = setup.optimizer.optimizer_class(named_param_groups(reference, WEIGHT_DECAY), **setup.optimizer_kwargs())
    for engine in engines.values():
        train(engine, 0, STEPS, rank, world)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(BATCH, 13, generator=g), torch.randn(BATCH, 3, generator=g)
        nn.functional.mse_loss(reference(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for p, ref in zip(engines["node"].model.parameters(), reference.parameters()):
        torch.testing.assert_close(full(p), ref.detach(), rtol=1e-4, atol=1e-4)
    return max(float((full(a) - full(b)).abs().max())
               for a, b in zip(engines["node"].model.parameters(), engines["world"].model.parameters()))


def cyclic_placement_error(rank, world):
    """Ranks placed round-robin over the nodes (SLURM --distribution=cyclic): refused."""
    os.environ["LOCAL_RANK"] = str(rank // 2)
    try:
        node_mesh("cpu")
    except NodeLayoutError as e:
        return str(e)
    finally:
        os.environ["LOCAL_RANK"] = str(rank % 2)
    return None


def layouts_suite(rank, world):
    for engine_name in ("zero", "fsdp2"):
        for opt in LR:
            check_optimizer_bitwise(rank, world, engine_name, opt)
    differences = {(name, opt, stage): node_against_world(rank, world, name, opt, stage)
                   for name, stage in (("zero", 2), ("zero", 1), ("fsdp2", 2)) for opt in LR}
    return differences, cyclic_placement_error(rank, world)


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_node_layout_equals_unsharded_and_world_within_tolerance():
    results = run_distributed(layouts_suite, 4, ranks_per_node=2, timeout=280)
    differences, error = results[0]
    print("max |node - world| after", STEPS, "steps:", {k: f"{v:.1e}" for k, v in differences.items()})
    assert all(d <= NODE_VS_WORLD_ATOL for d in differences.values()), differences
    assert all(r[0] == differences for r in results)  # every rank holds the same weights
    assert error and "rank 1 runs on" in error and "as local rank 0" in error and "--distribution=block" in error


# ---- checkpoints across layouts and world sizes --------------------------------------------
ENGINES = ("zero", "fsdp2")


def write(rank, world, folder):
    """Each engine in each layout: FIRST steps, a checkpoint, THEN more (the uninterrupted run)."""
    out = {}
    for name in ENGINES:
        for within in ("node", "world"):
            cfg = make_cfg(name, within)
            engine = engine_for(make_model(), cfg, LR["vsgd"])
            train(engine, 0, FIRST, rank, world)
            Checkpointer(Path(folder) / f"{name}-{within}", keep=1).save(engine, cfg, step=FIRST)
            train(engine, FIRST, THEN, rank, world)
            out[(name, within)] = [full(p).numpy() for p in engine.model.parameters()]
    return out


def load(rank, world, jobs, folder):
    """jobs: (checkpoint folder, engine, layout to load into). Load into a fresh engine (other
    initial weights), write it again, continue THEN steps."""
    out = {}
    for source, name, within in jobs:
        cfg = make_cfg(name, within)
        engine = engine_for(make_model(seed=1), cfg, LR["vsgd"])
        assert Checkpointer(Path(source), keep=1).load_latest(engine, cfg)["step"] == FIRST
        again = Path(folder) / f"{Path(source).name}-as-{within}"
        Checkpointer(again, keep=1).save(engine, cfg, step=FIRST)
        train(engine, FIRST, THEN, rank, world)
        out[(Path(source).name, within)] = ([full(p).numpy() for p in engine.model.parameters()], str(again))
    return out


def latest_full(folder):
    """(meta.json, full form) of the checkpoint in `folder`."""
    full = read_full(sorted(Path(folder).glob("step_*"))[-1])
    return full["meta"], full


def shard_writers(checkpoint: Path) -> set[int]:
    """The ranks whose files in a checkpoint folder hold chunks of the weights or optimizer
    state (DCP names each rank's file __<rank>_<n>.distcp)."""
    from vsgd_dist.compat.torch import MetadataUnpickler

    with open(Path(checkpoint) / ".metadata", "rb") as f:
        metadata = MetadataUnpickler(f).load()
    return {int(where.relative_path.split("_")[2]) for index, where in metadata.storage_data.items()
            if index.fqn.startswith(("master/", "optim/"))}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """Checkpoints of 2 nodes x 2 in both layouts, loaded at 2 x 2 in the other layout, at 2
    ranks (world) and at 3 nodes x 1 in both layouts."""
    root = tmp_path_factory.mktemp("layouts")
    written = run_distributed(write, 4, str(root / "written"), ranks_per_node=2, timeout=280)[0]
    ckpt = {(name, within): str(root / "written" / f"{name}-{within}") for name in ENGINES for within in ("node", "world")}
    loaded = {}
    for world, per_node, jobs in (
            (4, 2, [(ckpt[n, w], n, other) for n in ENGINES for w, other in (("node", "world"), ("world", "node"))]),
            (2, 2, [(ckpt[n, "node"], n, "world") for n in ENGINES]),
            (3, 1, [(ckpt[n, w], n, within) for n in ENGINES for w in ("node", "world") for within in ("node", "world")])):
        result = run_distributed(load, world, jobs, str(root / f"loaded{world}"), ranks_per_node=per_node,
                                 timeout=280)[0]
        loaded.update({(world, *key): value for key, value in result.items()})
    return written, ckpt, loaded


@pytest.mark.dist
@pytest.mark.timeout(900)
def test_checkpoints_move_between_layouts_and_world_sizes(layouts):
    written, ckpt, loaded = layouts
    for (world, source, within), (params, again) in loaded.items():
        name, written_within = source.split("-")
        reference = written[(name, written_within)]
        diff = max(float(np.abs(a - b).max()) for a, b in zip(params, reference))
        assert diff <= CKPT_ATOL, (world, source, within, diff)
        _, original = latest_full(ckpt[(name, written_within)])
        _, resaved = latest_full(again)
        for key in ("model", "optimizer"):
            assert original[key].keys() == resaved[key].keys()
            for param, value in original[key].items():
                if key == "model":
                    assert torch.equal(value, resaved[key][param]), (world, source, within, param)
                else:
                    for state_key, tensor in value.items():
                        assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(resaved[key][param][state_key]))


@pytest.mark.dist
@pytest.mark.timeout(900)
def test_node_checkpoints_hold_the_state_once(layouts):
    """Only the first node's ranks write shards; each holds 1/(ranks per node) of the state."""
    _, ckpt, _ = layouts
    for name in ENGINES:
        meta_node, _ = latest_full(ckpt[(name, "node")])
        meta_world, _ = latest_full(ckpt[(name, "world")])
        assert meta_node["world_size"] == meta_world["world_size"] == 4
        node_folder, world_folder = (sorted(Path(ckpt[(name, w)]).glob("step_*"))[-1] for w in ("node", "world"))
        assert shard_writers(node_folder) == {0, 1} and shard_writers(world_folder) == {0, 1, 2, 3}
        node, world = meta_node["state_bytes_per_rank"], meta_world["state_bytes_per_rank"]
        assert node[:2] == node[2:]  # each node all of it, as the world holds it once (up to padding)
        assert abs(sum(node[:2]) - sum(world)) <= 0.05 * sum(world), (name, node, world)  # ZeRO pads per split


# ---- refused layouts -----------------------------------------------------------------------
def test_ranks_per_node_comes_from_the_launcher(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_TASKS_PER_NODE", raising=False)
    assert ranks_per_node(4) == 4
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "2(x2)")
    assert ranks_per_node(4) == 2
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "2(x2),1")
    with pytest.raises(NodeLayoutError, match=r"the same number of ranks on every node, but "
                                              r"SLURM_TASKS_PER_NODE=2\(x2\),1"):
        ranks_per_node(5)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # the launcher's own count comes first
    with pytest.raises(NodeLayoutError, match="LOCAL_WORLD_SIZE=3 does not divide the world size 4"):
        ranks_per_node(4)
    assert ranks_per_node(6) == 3


def test_engines_that_cannot_shard_within_a_node_are_refused():
    for engine in ("ddp", "deepspeed"):
        with pytest.raises(ConfigError, match=f"engine.shard_within=node needs engine.name=zero or fsdp2; {engine}"):
            load_recipe(REPO / "recipes/demo.yaml", [f"engine={engine}", "shard_within=node"])
    with pytest.raises(ConfigError, match="engine.shard_within='nodes' is not one of world, node"):
        load_recipe(REPO / "recipes/demo.yaml", ["shard_within=nodes"])


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_srun_with_uneven_tasks_per_node_fails_before_joining(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k != "LOCAL_WORLD_SIZE"},
           "RANK": "0", "WORLD_SIZE": "4", "SLURM_TASKS_PER_NODE": "3,1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "1"}
    res = subprocess.run([sys.executable, "-m", "launch", "run", "recipes/demo.yaml", "--from-env",
                          "shard_within=node", f"out={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=100)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "needs the same number of ranks on every node, but SLURM_TASKS_PER_NODE=3,1" in res.stderr
