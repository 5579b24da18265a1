"""Bytes each rank sends per training step inside its node and across nodes, engine.shard_within
`world` against `node`, for the zero (stage 2) and fsdp2 engines on ResNet-50 and ViT-B/16
parameter lists (real shapes from `model_shapes`).

Counted from the collectives the engines issue: N gloo ranks numbered as nodes
(`run_distributed(..., ranks_per_node=R)`, as SLURM numbers them) build each engine with VSGD
over a model of those parameters (loss = sum of each block's parameters, so every parameter
gets a gradient), take a warm-up step, then one step (`engine.backward` + `engine.step`, the
trainer's) with every torch.distributed collective wrapped: kind, group ranks, tensor bytes.
Each call is turned into bytes sent per destination rank as a ring over the group's ranks in
order sends them (what NCCL and gloo run; with ranks numbered node by node a flat ring
crosses between nodes once per node): reduce-scatter and all-gather of a buffer of n bytes
send (g - 1) / g * n to the next rank of the group, all-reduce twice that. "inside" and
"across" are then the mean over ranks of what goes to a rank of the same or of another node.
"direct" is the same calls counted as a direct exchange (n / g to each peer), where every rank
sends the same. Collectives on a few bytes (the gradient norm) are included; DTensor's own
reductions (fsdp2's norm, a few bytes) go through functional collectives and are not seen.
gloo itself runs a reduce-scatter as an all-reduce of the whole buffer, so on gloo clusters
the reduce-scatter bytes double (README: measured on the local multi-node cluster).

    python bench/comm_bytes.py [--models resnet50 vit_b16] [--layouts 2x2 4x2]
"""
from __future__ import annotations

import argparse
import gc
import inspect
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_shapes import MODELS, numel  # noqa: E402

from vsgd_dist.config import RunConfig  # noqa: E402
from vsgd_dist.engines import engine_class  # noqa: E402
from vsgd_dist.train.engine_setup import engine_for  # noqa: E402
from vsgd_dist.spawn import run_distributed  # noqa: E402

PAYLOAD = {"all_gather_single": "output_tensor", "all_gather_into_tensor": "output_tensor",
           "reduce_scatter_single": "input", "reduce_scatter_tensor": "input", "all_reduce": "tensor"}
"""Collectives counted, and the argument whose bytes are the buffer n."""
NOT_COUNTED = ("broadcast", "all_gather", "reduce_scatter", "all_to_all_single", "reduce", "gather", "scatter",
               "all_reduce_coalesced", "all_gather_object")
"""Collectives a step must not issue (the count would miss them)."""
ENGINES = ("zero", "fsdp2")
LAYOUTS = ("world", "node")


class ParameterModel(nn.Module):
    """The parameters in about 12 blocks (FSDP2 shards each block); forward: the sum of all."""

    def __init__(self, shapes, num_blocks: int = 12):
        super().__init__()
        target, chunks, filled = numel(shapes) / num_blocks, [[]], 0
        for shape in shapes:
            if chunks[-1] and filled >= target:
                chunks.append([])
                filled = 0
            chunks[-1].append(shape)
            filled += numel([shape])
        self.blocks = nn.ModuleList(Block(chunk) for chunk in chunks)

    def forward(self):
        x = torch.zeros(())
        for block in self.blocks:
            x = block(x)
        return x


class Block(nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.zeros(s)) for s in shapes)

    def forward(self, x):
        return x + sum(p.sum() for p in self.weights) * 1e-3


def record_collectives(log: list) -> None:
    """Wrap every collective in torch.distributed, and its aliases in the vsgd_dist modules
    loaded so far (the ZeroOptimizer binds its own), so that calls append to `log`. Once per
    process, after the engines are imported."""
    wrapped = {}
    for name in (*PAYLOAD, *NOT_COUNTED):
        original = getattr(dist, name, None)
        if original is not None:
            wrapped[original] = _recording(name, original, log)
    modules = [dist, *(m for n, m in list(sys.modules.items()) if n.startswith("vsgd_dist"))]
    for module in modules:
        for attr, value in list(vars(module).items()):
            if callable(value) and value in wrapped:
                setattr(module, attr, wrapped[value])


def _recording(kind: str, collective, log: list):
    signature = inspect.signature(collective)

    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        group = bound.get("group")
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        tensor = bound.get(PAYLOAD.get(kind, ""))
        log.append((kind, ranks, tensor.numel() * tensor.element_size() if tensor is not None else 0))
        return collective(*args, **kwargs)

    return call


def bytes_sent(log: list, rank: int, per_node: int) -> dict[str, float]:
    """Bytes this rank sends to its node and to other nodes (ring and direct exchange)."""
    out = {"inside": 0.0, "across": 0.0, "direct inside": 0.0, "direct across": 0.0, "calls": 0}
    for kind, ranks, n in log:
        if kind not in PAYLOAD:
            raise RuntimeError(f"a step issued {kind}, which this count does not cover")
        out["calls"] += 1
        g = len(ranks)
        if g == 1:
            continue
        passes = 2 if kind == "all_reduce" else 1
        successor = ranks[(ranks.index(rank) + 1) % g]
        out["inside" if successor // per_node == rank // per_node else "across"] += passes * (g - 1) / g * n
        for peer in ranks:
            if peer != rank:
                out["direct inside" if peer // per_node == rank // per_node else "direct across"] += passes * n / g
    return out


def count_rank(rank, world_size, per_node, model_name, engine_name):
    """{layout: bytes_sent of one step} of `engine_name` on this rank (one engine at a time:
    8 ranks of ViT-B/16 with VSGD state fill this machine's memory)."""
    log: list = []
    engine_class(engine_name)
    record_collectives(log)
    results = {}
    for layout in LAYOUTS:
        cfg = RunConfig()
        cfg.engine.name, cfg.engine.shard_within, cfg.model.channels_last = engine_name, layout, False
        engine = engine_for(ParameterModel(MODELS[model_name]()), cfg, 1e-3)
        for _ in range(2):  # a warm-up step, then the counted one
            log.clear()
            engine.backward(engine.wrapped())
            engine.step()
        results[layout] = bytes_sent(log, rank, per_node)
        del engine
        gc.collect()
    return results


def pair(mean: dict, key: str, scale: float = 1e-6, digits: int = 1) -> str:
    """"world / node" of one count (bytes in MB by default)."""
    return " / ".join(f"{mean[within][key] * scale:.{digits}f}" for within in LAYOUTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_b16"], choices=sorted(MODELS))
    parser.add_argument("--layouts", nargs="+", default=["2x2", "4x2"], help="NODESxRANKS_PER_NODE")
    args = parser.parse_args()
    # glibc's own settings, not the ranks' caching allocator (vsgd_dist.allocator): counting needs
    # no speed, and memory given back lets 8 ranks of ViT-B/16 with VSGD state fit in 24 GiB
    os.environ.update(MALLOC_MMAP_MAX_="65536", MALLOC_TRIM_THRESHOLD_="131072")
    print(f"torch {torch.__version__}, gloo, ranks numbered node by node; MB (10^6 bytes) each rank sends in one "
          "step, mean over ranks, shard_within world / node (zero: ZeRO-2; fsdp2: FSDP2, HSDP with node)\n")
    print("| model | nodes x ranks | engine | collectives | sent | inside node | across nodes "
          "| across nodes, direct exchange |")
    print("|---|---|---|---|---|---|---|---|")
    for model_name in args.models:
        for layout in args.layouts:
            nodes, per_node = map(int, layout.split("x"))
            world = nodes * per_node
            for engine_name in ENGINES:
                per_rank = run_distributed(count_rank, world, per_node, model_name, engine_name,
                                           ranks_per_node=per_node, timeout=1800)
                mean = {within: {k: sum(r[within][k] for r in per_rank) / world for k in per_rank[0][within]}
                        for within in LAYOUTS}
                for counts in mean.values():
                    counts["sent"] = counts["inside"] + counts["across"]
                cells = [pair(mean, "calls", 1, 0), *(pair(mean, k) for k in ("sent", "inside", "across", "direct across"))]
                print(f"| {model_name} | {nodes} x {per_node} | {engine_name} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    from results import run_recorded

    sys.exit(run_recorded("comm_bytes", main))
