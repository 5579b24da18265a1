"""Native ZeRO: the ZeroOptimizer shards optimizer state (stage 1, behind DDP) or state
and gradients (stage 2, hooks reduce-scatter gradients during backward), over the world or,
with engine.shard_within=node, over the ranks of each node (every node holds the same shards)."""
from __future__ import annotations

import contextlib

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import torch

from vsgd_dist.distributed import node_mesh
from vsgd_dist.engines.base import Engine
from vsgd_dist.sharding import ZeroOptimizer, consolidate, shard_from_full
from vsgd_dist.sharding.layout import from_memory_flat, to_memory_flat
from vsgd_dist.full_form import groups_in_order, hyperparameters


class ZeroEngine(Engine):
    name = "zero"

    def __init__(self, model, cfg, lr):
        super().__init__(model, cfg, lr)
        stage = cfg.engine.zero_stage
        mesh = node_mesh(next(model.parameters()).device.type) if cfg.engine.shard_within == "node" else None
        self.shard_group = mesh.get_group("shard") if mesh is not None else None
        self.first_replica = mesh is None or mesh.get_local_rank("replicate") == 0
        """Whether this rank's node is the first: the other nodes hold the same shards, and only
        the first node's ranks write theirs into checkpoints."""
        self.optimizer = ZeroOptimizer(self.param_groups, self.optimizer_class, stage=stage,
                                       process_group=self.shard_group,
                                       replicate_group=mesh.get_group("replicate") if mesh is not None else None,
                                       bucket_cap_mb=cfg.engine.bucket_mb,
                                       prefetch=cfg.engine.prefetch_params and not cfg.model.compile,
                                       **self.optimizer_kwargs)
        if self.optimizer.prefetch:
            self._wait_in_forward(model)
        # ZeroOptimizer moved the parameters into flat buffers; DDP must wrap them after.
        self.wrapped = (DistributedDataParallel(model, broadcast_buffers=False, bucket_cap_mb=cfg.engine.bucket_mb)
                       if stage == 1 and dist.is_initialized() else model)

    def _wait_in_forward(self, model) -> None:
        """Before each module's forward, wait for the gathers of the buckets holding the
        parameters it registers (`engine.prefetch_params`)."""
        owners: dict[int, str] = {}
        for module_name, module in model.named_modules():
            for name, param in module.named_parameters(recurse=False):
                if id(param) in owners:
                    raise ValueError(f"engine.prefetch_params: parameter {module_name}.{name} is also "
                                     f"{owners[id(param)]} (tied weights); set engine.prefetch_params=false")
                owners[id(param)] = f"{module_name}.{name}"
            buckets = self.optimizer.buckets_of(module.parameters(recurse=False))
            if buckets:
                module.register_forward_pre_hook(lambda _module, _args, b=buckets: self.optimizer.wait_for_buckets(b))

    @property
    def model(self):
        """The model, its parameters the current weights: a gather a step left running
        (`engine.prefetch_params`) is waited for here. The training forward goes through
        `wrapped`, whose modules wait bucket by bucket instead."""
        if "optimizer" in self.__dict__:
            self.optimizer.wait_for_parameters()
        return self._model

    @model.setter
    def model(self, model):
        self._model = model

    def restore(self):
        """The mean weights after samples (IVON), and the end of any gather a step left running."""
        self.optimizer.restore()

    def clip_grad_norm(self, max_norm):
        return self.optimizer.clip_grad_norm_(max_norm)

    @contextlib.contextmanager
    def no_sync(self):
        """Stage 1: DDP's no_sync; stage 2: the ZeroOptimizer's hooks skip the reduce-scatter."""
        with super().no_sync(), self.optimizer.no_sync():
            yield

    def state_bytes(self):
        return self.optimizer.state_bytes()

    # ---- gradient transforms: flat per-bucket shards, like the masters ---------------------
    def reduced_grads(self):
        return self.optimizer.reduced_grads()

    def local_weights(self):
        return list(self.optimizer.masters)

    def set_local_weights(self, weights):
        self.optimizer.set_masters(weights)

    def grad_state_payload(self, state):
        """Every rank of the first node writes its own shards; where they lie is in its
        optimizer layout."""
        return dict(state) if self.first_replica else {}

    @classmethod
    def grad_state_full(cls, read, meta):
        """Each parameter's tensor put together from every shard's owned part of it."""
        files = [read(rank) for rank in range(shard_count(read))]
        full = {key: {} for key in files[0]["grad_state"]}
        for name, param in files[0]["optimizer"]["params"].items():
            start, end = param["range"]
            for key, by_name in full.items():
                flat = None
                for f in files:
                    part = f["optimizer"]["params"][name]
                    lo, hi = part["owned"]
                    if lo == hi:
                        continue
                    source = f["grad_state"][key][part["bucket"]]
                    offset = lo - f["optimizer"]["buckets"][part["bucket"]]["owned"][0]
                    if flat is None:
                        flat = source.new_zeros(end - start)
                    flat[lo - start:hi - start] = source[offset:offset + hi - lo]
                by_name[name] = from_memory_flat(flat, tuple(param["shape"]), tuple(param["dim_order"])).contiguous()
        return full

    def grad_state_from_full(self, full):
        """Cut this rank's part of each bucket out of the full tensors; padding is zero, as in
        the reduced gradient."""
        opt = self.optimizer
        out = {}
        for key, by_name in full.items():
            dtype = next(iter(by_name.values())).dtype
            shards = [torch.zeros(b.shard_numel, dtype=dtype, device=opt.device) for b in opt.buckets]
            for slot in opt.slots:
                first, last, offset = opt._owned_in_master(slot)
                if first < last:
                    flat = to_memory_flat(by_name[slot.name].to(opt.device), slot.dim_order)
                    shards[slot.bucket][offset:offset + last - first] = flat[first:last]
            out[key] = shards
        return out

    def state_pieces(self, keys):
        return self.optimizer.state_pieces(keys)

    def checkpoint_state(self):
        self.restore()  # the weights rank 0 saves are the mean (a sampling step defers its gather)
        rank = dist.get_rank() if dist.is_initialized() else 0
        # this rank's shard + its layout, written by the first node (the others hold the same)
        state = {"optimizer": self.optimizer.state_dict()} if self.first_replica else {}
        if rank == 0:
            state["model"] = self.model.state_dict()
        return state

    def _load_own_shard(self, read, meta):
        """Each rank loads the shard of its rank in the shard group when the checkpoint was cut
        into as many shards (e.g. 2 ranks, or 2 nodes x 2 with engine.shard_within=node, for a
        run at 2 ranks per shard group) with the same layout."""
        if meta["engine"] != self.name or shard_count(read) != self.optimizer.world_size:
            return False
        saved = read(self.optimizer.rank)["optimizer"]
        layout = self.optimizer.layout()
        if any(saved[key] != layout[key] for key in layout):  # other parameters or bucket_mb
            return False
        self._load_model(read(0)["model"])
        self.optimizer.load_state_dict(saved)
        return True

    def load_full_state(self, full):
        """Cut this rank's flat shard out of the full form (`reshard.shard_from_full`);
        masters come from the full form's fp32 masters, else from the loaded weights."""
        self._load_model(full["model"])
        groups = groups_in_order(full, self._names_per_group())
        per_param = {}
        for name in (n for names in self._names_per_group() for n in names):
            master = full["master"].get(name, full["model"][name]).float()
            per_param[name] = {**full["optimizer"].get(name, {}), "master": master}
        self.optimizer.load_state_dict(shard_from_full(per_param, self.optimizer, groups))

    @classmethod
    def _full_state_parts(cls, read, meta):
        """The full form of a ZeRO checkpoint: every shard consolidated."""
        model = read(0)["model"]
        shards = [read(rank)["optimizer"] for rank in range(shard_count(read))]
        optimizer, master = {}, {}
        for name, state in consolidate(shards).items():
            fp32 = state.pop("master")
            if model[name].dtype != fp32.dtype:  # bf16 weights: the master holds the precision
                master[name] = fp32
            optimizer[name] = state
        groups = [{**hyperparameters(g), "param_names": g["param_names"]} for g in shards[0]["param_groups"]]
        return {"model": model, "master": master, "optimizer": optimizer, "param_groups": groups}


def shard_count(read) -> int:
    """How many shards a ZeRO checkpoint holds: one per rank of its shard group (the world,
    or a node), written by ranks 0 .. count - 1."""
    return read(0)["optimizer"]["world_size"]
