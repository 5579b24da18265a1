"""ZeRO-1/2 for any elementwise optimizer, on plain torch.distributed collectives.

Every rank keeps the full parameters (as views into flat per-bucket buffers, see `layout`)
but optimizer state for only 1/W of the elements: its inner optimizer (an instance of
`optimizer_class`) owns one flat fp32 "master" slice per bucket, this rank's part of it. For
fp32 parameters the master IS that part of the bucket (no copy: the optimizer updates the
parameters in place and the all-gather sends the slice from where it lies); for bf16/fp16
parameters it is an fp32 copy. Elementwise optimizers (VSGD, Adam, AdamW, SGD) give the same
result on flat slices as on the whole tensors, so sharded training equals unsharded training
given the same averaged gradient.

- stage 1: the model is DDP-wrapped, so `.grad` already holds the average; each rank copies
  its slice, steps, and all-gathers the parameters.
- stage 2: the model is NOT wrapped; gradients are averaged with a bucketed reduce-scatter
  launched from post-accumulate-grad hooks while backward still runs, each `.grad` is freed
  as soon as it is copied into its bucket, and each rank keeps only its reduced slice.

Hierarchical sharding: with a `replicate_group` (the ranks of other nodes that hold the same
shard), `process_group` is this node's ranks; stage 2 then all-reduces each reduce-scattered
slice over `replicate_group` (stage 1's DDP averages over the world), and the all-gather of
the parameters stays inside the node.

Gradients are reduced in `reduce_dtype` (fp32 by default, also for bf16 models) and the
masters are fp32; the all-gather writes them back in the parameters' own dtype.
An inner optimizer that trains at weight samples (IVON) is driven through its declared
`Sampler` (section "weight samples" below), and is driven alike itself (`sample`,
`accumulate`, `mean_weights`).
Gradient accumulation: run all micro-batches but the last inside `no_sync()`. As with DDP,
every rank must produce gradients for the same parameters in each backward (a bucket is
reduced when all its gradients arrived; the rest are reduced in `step()`, with zeros for
parameters that got none).
"""
from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Any, Iterable

import torch
import torch.distributed as dist

from vsgd_dist.registry import class_path
from vsgd_dist.sharding.layout import Slot, from_memory_flat, is_per_element, owned_part, plan, to_memory_flat

if TYPE_CHECKING:
    from vsgd_dist.optim.registry import Sampler

STATE_DICT_FORMAT = "vsgd_dist.zero/1"
ELEMENTWISE_OPTIMIZERS = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def check_elementwise(optimizer_class: type) -> None:
    if optimizer_class in ELEMENTWISE_OPTIMIZERS or getattr(optimizer_class, "elementwise", False) is True:
        return
    raise ValueError(f"{class_path(optimizer_class)} is not known to be elementwise, so sharding it "
                     "at element granularity may change its result: if every update of an element "
                     "depends only on that element, set the class attribute `elementwise = True`")


class ZeroOptimizer(torch.optim.Optimizer):
    """Shard an elementwise optimizer's state (stage 1) and gradients (stage 2) across ranks.

    `param_groups` here are the source of truth for hyperparameters (LR schedulers write
    them); they are copied into the inner optimizer's groups before each step.
    """

    def __init__(self, params: Iterable, optimizer_class: type, *, stage: int = 2,
                 process_group: dist.ProcessGroup | None = None,
                 replicate_group: dist.ProcessGroup | None = None, bucket_cap_mb: float = 25.0,
                 reduce_dtype: torch.dtype = torch.float32, prefetch: bool = False,
                 sampler: Sampler | None = None, **optimizer_kwargs: Any):
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 (DDP-averaged gradients) or 2 (sharded gradients), got {stage!r}")
        check_elementwise(optimizer_class)
        super().__init__(params, dict(optimizer_kwargs))
        named_groups = self._name_groups()
        devices = {p.device for group in named_groups for _, p in group}
        if len(devices) > 1:
            raise ValueError(f"parameters are on several devices {sorted(map(str, devices))}: "
                             "ZeroOptimizer needs all of them on one device")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call dist.init_process_group() "
                               "before building a ZeroOptimizer")
        self.stage = stage
        self.process_group = process_group
        self.replicate_group = replicate_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.replicas = dist.get_world_size(replicate_group) if replicate_group is not None else 1
        if self.rank < 0:
            raise ValueError("this process is not a member of `process_group`: build the "
                             "ZeroOptimizer only on the group's ranks")
        self.reduce_dtype = reduce_dtype
        self.sampler = sampler
        """The inner optimizer's sampling capability (its registry entry's), or None."""
        self.prefetch = prefetch
        """After a step, leave the parameters' all-gathers running: the caller completes each
        bucket's with `wait_for_buckets` before its parameters are read (ZeroEngine: from
        forward pre-hooks), so the gather overlaps the next forward."""
        self._gathering: dict[int, tuple] = {}  # bucket index -> (async work, its source tensor)
        self.device = devices.pop() if devices else torch.device("cpu")
        self._params = [p for group in named_groups for _, p in group]
        self.slots, self.buckets = plan(named_groups, self.world_size, int(bucket_cap_mb * 2**20))
        self._param_buffers = self._pack_parameters()
        self.masters = self._build_masters()
        self._grad_shards = [torch.zeros_like(m) for m in self.masters]
        self.inner = optimizer_class(
            [{**self._hyperparameters(g), "params": self._group_masters(i)} for i, g in enumerate(self.param_groups)],
            **optimizer_kwargs)
        self.defaults = dict(self.inner.defaults)
        for group, inner_group in zip(self.param_groups, self.inner.param_groups):
            for key, value in self._hyperparameters(inner_group).items():
                group.setdefault(key, value)
        self._sync_enabled = True
        self._reset_grad_sync()
        if stage == 2:
            for slot_index, param in enumerate(self._params):
                if param.requires_grad:
                    param.register_post_accumulate_grad_hook(lambda _p, i=slot_index: self._on_grad_ready(i))
        self._gather_parameters()

    # ---- construction -------------------------------------------------------------------

    def _name_groups(self) -> list[list[tuple[str, torch.Tensor]]]:
        """Names from "param_names" (or (name, tensor) pairs), else positional "param{i}"."""
        named, seen, position = [], set(), 0
        for group in self.param_groups:
            names = group.get("param_names") or [f"param{position + i}" for i in range(len(group["params"]))]
            group["param_names"] = list(names)
            position += len(names)
            duplicates = seen.intersection(names)
            if duplicates or len(set(names)) != len(names):
                raise ValueError(f"parameter names must be unique, repeated: {sorted(duplicates or names)[0]!r}")
            seen.update(names)
            named.append(list(zip(names, group["params"])))
        return named

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "inner"):  # groups can only be given at construction (buckets are fixed)
            raise NotImplementedError("ZeroOptimizer cannot add param groups after construction: "
                                      "pass all groups to the constructor")
        super().add_param_group(param_group)

    @staticmethod
    def _hyperparameters(group: dict) -> dict:
        return {k: v for k, v in group.items() if k not in ("params", "param_names")}

    def _pack_parameters(self) -> list[torch.Tensor]:
        """Move every parameter into its bucket's flat buffer and make it a view of it."""
        buffers = [torch.zeros(b.padded_numel, dtype=b.dtype, device=self.device) for b in self.buckets]
        for param, slot in zip(self._params, self.slots):
            view = from_memory_flat(buffers[slot.bucket][slot.start:slot.end], slot.shape, slot.dim_order)
            view.copy_(param.detach())
            param.data = view
        return buffers

    def _build_masters(self) -> list[torch.Tensor]:
        """Per bucket: this rank's slice of it, in fp32 (the slice itself for fp32 buckets)."""
        masters = []
        for bucket, buffer in zip(self.buckets, self._param_buffers):
            lo, hi = bucket.owned(self.rank)
            masters.append(buffer[lo:hi] if bucket.dtype == torch.float32 else buffer[lo:hi].float())
        return masters

    def _group_masters(self, group_index: int) -> list[torch.Tensor]:
        return [m for b, m in zip(self.buckets, self.masters) if b.group == group_index]

    # ---- gradient synchronization -------------------------------------------------------

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients in `.grad` (no communication) for all but the last micro-batch."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def _reset_grad_sync(self) -> None:
        for work, _, _ in getattr(self, "_in_flight", {}).values():
            work.wait()
        self._waiting_for = [len(b.slots) for b in self.buckets]
        self._grad_inputs: list[torch.Tensor | None] = [None] * len(self.buckets)
        self._in_flight: dict[int, tuple[dist.Work, torch.Tensor, torch.Tensor]] = {}
        self._grads_ready = False

    def _on_grad_ready(self, slot_index: int) -> None:
        if not self._sync_enabled:
            return
        slot = self.slots[slot_index]
        if self._waiting_for[slot.bucket] == 0:
            raise RuntimeError(f"gradient of {slot.name} arrived twice before step(): run the "
                               "accumulation micro-batches inside optimizer.no_sync()")
        self._copy_grad_into_bucket(slot_index)
        if self._waiting_for[slot.bucket] == 0:
            self._launch_reduce_scatter(slot.bucket)

    def _copy_grad_into_bucket(self, slot_index: int) -> None:
        slot, param = self.slots[slot_index], self._params[slot_index]
        if self._grad_inputs[slot.bucket] is None:
            bucket = self.buckets[slot.bucket]
            self._grad_inputs[slot.bucket] = torch.zeros(bucket.padded_numel, dtype=self.reduce_dtype,
                                                         device=self.device)
        flat = self._grad_inputs[slot.bucket][slot.start:slot.end]
        from_memory_flat(flat, slot.shape, slot.dim_order).copy_(param.grad)
        param.grad = None
        self._waiting_for[slot.bucket] -= 1

    def _launch_reduce_scatter(self, bucket_index: int) -> None:
        bucket = self.buckets[bucket_index]
        grad_input = self._grad_inputs[bucket_index]
        self._grad_inputs[bucket_index] = None
        target = self._grad_shards[bucket_index]
        output = target if self.reduce_dtype == target.dtype else torch.empty(
            bucket.shard_numel, dtype=self.reduce_dtype, device=self.device)
        work = _reduce_scatter(output, grad_input, op=dist.ReduceOp.SUM, group=self.process_group,
                               async_op=True)
        self._in_flight[bucket_index] = (work, grad_input, output)

    def _finish_grad_sync(self) -> None:
        """Make each master's `.grad` the rank's slice of the averaged gradient (idempotent)."""
        if self._grads_ready:
            return
        if self.stage == 1:
            self._copy_owned_grads()
        else:
            self._reduce_remaining_buckets()
            reduced = []
            for bucket_index in sorted(self._in_flight):
                work, _, output = self._in_flight.pop(bucket_index)
                work.wait()
                across = (dist.all_reduce(output, op=dist.ReduceOp.SUM, group=self.replicate_group, async_op=True)
                          if self.replicas > 1 else None)  # the node's sum of this slice, summed over the nodes
                reduced.append((bucket_index, across, output))
            for bucket_index, across, output in reduced:
                if across is not None:
                    across.wait()
                target = self._grad_shards[bucket_index]
                if output is not target:
                    target.copy_(output)
            for grad in self._grad_shards:
                grad.div_(self.world_size * self.replicas)
        for master, grad in zip(self.masters, self._grad_shards):
            master.grad = grad
        self._grads_ready = True

    def _reduce_remaining_buckets(self) -> None:
        """Reduce buckets whose hooks did not all fire (gradients set by hand, unused params)."""
        for bucket_index, bucket in enumerate(self.buckets):
            if self._waiting_for[bucket_index] == 0:
                continue
            for slot_index in bucket.slots:
                if self._params[slot_index].grad is not None:
                    self._copy_grad_into_bucket(slot_index)
            if self._grad_inputs[bucket_index] is None:
                self._grad_inputs[bucket_index] = torch.zeros(bucket.padded_numel, dtype=self.reduce_dtype,
                                                              device=self.device)
            self._waiting_for[bucket_index] = 0
            self._launch_reduce_scatter(bucket_index)

    def _copy_owned_grads(self) -> None:
        for param, slot in zip(self._params, self.slots):
            first, last, offset = self.owned_in_master(slot)
            target = self._grad_shards[slot.bucket][offset:offset + last - first]
            if param.grad is None:
                target.zero_()
            else:
                target.copy_(to_memory_flat(param.grad, slot.dim_order)[first:last])

    def reduced_grads(self) -> list[torch.Tensor]:
        """This rank's slice of the averaged gradient, one flat tensor per bucket laid out like
        `masters` (what the masters' `.grad` will be): edit it in place before clipping and
        the step (gradient transforms). Waits for the reduction. Bucket padding holds zeros."""
        self._finish_grad_sync()
        return self._grad_shards

    @torch.no_grad()
    def publish_masters(self) -> None:
        """After writing into `masters` (every rank its own): all-gather them into the
        parameters."""
        self._gather_parameters()

    # ---- step ---------------------------------------------------------------------------

    def _gather_parameters(self, wait: bool = True) -> None:
        """Every rank's masters into every rank's buckets (in place for fp32 buckets); with
        wait=False the gathers are left running (see `prefetch`)."""
        self.wait_for_parameters()
        for index, (bucket, buffer, master) in enumerate(zip(self.buckets, self._param_buffers, self.masters)):
            source = master.to(bucket.dtype)  # kept alive until the gather is waited for
            self._gathering[index] = (_all_gather(buffer, source, group=self.process_group, async_op=True), source)
        if wait:
            self.wait_for_parameters()

    def buckets_of(self, params: Iterable[torch.Tensor]) -> tuple[int, ...]:
        """The buckets that hold any of `params`, in order (tensors not sharded here are skipped)."""
        bucket_of = {id(p): slot.bucket for p, slot in zip(self._params, self.slots)}
        return tuple(sorted({bucket_of[id(p)] for p in params if id(p) in bucket_of}))

    def wait_for_buckets(self, indices: Iterable[int]) -> None:
        """Complete the all-gathers of these buckets still running (on NCCL the current
        stream waits, not the host)."""
        for index in indices:
            pending = self._gathering.pop(index, None)
            if pending is not None:
                pending[0].wait()

    @property
    def gathers_running(self) -> int:
        """How many buckets' all-gathers are still running (`prefetch` leaves them after a step)."""
        return len(self._gathering)

    def wait_for_parameters(self) -> None:
        """Complete every all-gather still running: the parameters are the new weights."""
        self.wait_for_buckets(list(self._gathering))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.wait_for_parameters()  # buckets no forward used are still gathering from the masters
        self._finish_grad_sync()
        self._copy_hyperparameters()
        self.inner.step()
        self._publish_step()
        for master in self.masters:
            master.grad = None
        self._reset_grad_sync()
        return loss

    def _copy_hyperparameters(self) -> None:
        for group, inner_group in zip(self.param_groups, self.inner.param_groups):
            inner_group.update(self._hyperparameters(group))

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for master in self.masters:
            master.grad = None
        self._reset_grad_sync()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the averaged gradient by its global norm (reduced across ranks); return the norm."""
        self._finish_grad_sync()
        if norm_type == float("inf"):
            local = torch.stack([g.abs().max() if g.numel() else g.new_zeros(()) for g in self._grad_shards]).max()
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self.process_group)
            total = local
        elif norm_type == 2.0:
            local = torch.stack([g.square().sum() for g in self._grad_shards]).sum()
            dist.all_reduce(local, op=dist.ReduceOp.SUM, group=self.process_group)
            total = local.sqrt()
        else:
            raise ValueError(f"norm_type must be 2.0 or inf, got {norm_type!r}")
        coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(self._grad_shards, coefficient)
        return total

    # ---- weight samples -------------------------------------------------------------------
    # An inner optimizer that trains at weight samples (its `sampler`, e.g. IVON's, see
    # vsgd_dist.optim.ivon) perturbs this rank's masters, and the all-gather writes m + eps
    # into every rank's parameters. Its step leaves the parameters as they were (the last
    # sample): the next sample's all-gather replaces the one of the mean, so a step moves the
    # same bytes as an AdamW step, and mean_weights() gathers the mean when something reads it.

    _params_hold_mean = True
    """False while the parameters hold a weight sample, or the weights before a deferred gather."""

    @functools.cached_property
    def noise_runs(self) -> list[list[tuple[int, int]]]:
        """Per master (bucket), where this rank's master elements lie among the unsharded
        optimizer's elements (its parameters end to end in group order, each in memory order):
        runs (start, length) in master order, for `Sampler.set_global_offset`. Bucket padding
        takes indices past every parameter (its noise is never used)."""
        base, total = [], 0
        for param in self._params:
            base.append(total)
            total += param.numel()
        runs: list[list[tuple[int, int]]] = [[] for _ in self.masters]
        for bucket_index, bucket in enumerate(self.buckets):
            lo, hi = bucket.owned(self.rank)
            for index in bucket.slots:
                first, last, _ = owned_part(self.slots[index], bucket, self.rank)
                if first < last:
                    runs[bucket_index].append((base[index] + first, last - first))
            if hi > max(lo, bucket.numel):
                runs[bucket_index].append((total, hi - max(lo, bucket.numel)))
        return runs

    @torch.no_grad()
    def sample(self, mc_sample: int = 0, evaluation: bool = False) -> None:
        """The inner optimizer's sample `mc_sample` on this rank's masters (every element
        draws the noise the unsharded optimizer draws for it), then one all-gather of m + eps
        into the parameters (with `prefetch`, left running: the forward waits for each bucket
        as a step's gather)."""
        self.wait_for_parameters()  # sampling overwrites the masters a running gather reads
        for master, runs in zip(self.masters, self.noise_runs):
            self.sampler.set_global_offset(self.inner, master, runs)
        self._copy_hyperparameters()
        self.sampler.sample(self.inner, mc_sample, evaluation=evaluation)
        self._gather_parameters(wait=not self.prefetch)
        self._params_hold_mean = False

    @torch.no_grad()
    def accumulate(self) -> None:
        """After the backward of a weight sample that another follows: the averaged gradient
        shard goes into the inner optimizer's sums, and the gradients are cleared."""
        self._finish_grad_sync()
        self.sampler.accumulate(self.inner)
        self.zero_grad()

    @torch.no_grad()
    def mean_weights(self) -> None:
        """Make the parameters the mean weights again (after samples, or after a sampling
        step, which leaves their all-gather to this or to the next sample)."""
        self.wait_for_parameters()  # a sample's gather may still read the masters restored here
        if self._params_hold_mean:
            return
        self.sampler.mean_weights(self.inner)
        self._gather_parameters()
        self._params_hold_mean = True

    def mc_samples(self) -> int:
        return self.sampler.mc_samples(self.inner)

    def _publish_step(self) -> None:
        """After the update, all-gather the new weights; an inner optimizer that samples
        leaves that to its next sample() (or to mean_weights())."""
        if self.sampler is not None:
            self._params_hold_mean = False
        else:
            self._gather_parameters(wait=not self.prefetch)

    # ---- memory and diagnostics -----------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes of per-element optimizer state on this rank (padding included, no masters/grads)."""
        return sum(v.nbytes for m in self.masters for v in self.inner.state.get(m, {}).values()
                   if is_per_element(v, m.shape))

    def state_pieces(self, keys: tuple[str, ...]):
        """(parameter name, *state tensors `keys`, hyperparameters) for the part of each
        parameter this rank owns: the input of `vsgd_dist.optim.diagnostics.reduced_diagnostics`."""
        for slot in self.slots:
            first, last, offset = self.owned_in_master(slot)
            state = self.inner.state.get(self.masters[slot.bucket], {})
            if first == last or not state or int(state["step"]) == 0:
                continue
            if not set(keys) <= state.keys():
                raise ValueError(f"diagnostics need the state {', '.join(keys)}, {type(self.inner).__name__} "
                                 "keeps " + ", ".join(sorted(state)))
            part = slice(offset, offset + last - first)
            yield slot.name, *(state[k][part] for k in keys), self.param_groups[slot.group]

    def owned_in_master(self, slot: Slot) -> tuple[int, int, int]:
        """`owned_part` of `slot`, with its place counted in its bucket's master."""
        first, last, offset = owned_part(slot, self.buckets[slot.bucket], self.rank)
        return first, last, offset - self.buckets[slot.bucket].shard_offset

    # ---- checkpoints --------------------------------------------------------------------

    def layout(self) -> dict[str, Any]:
        """Where each parameter and this rank's part of it live (the state_dict's metadata)."""
        params = {}
        for slot in self.slots:
            bucket = self.buckets[slot.bucket]
            first, last, offset = owned_part(slot, bucket, self.rank)
            params[slot.name] = {
                "group": slot.group, "bucket": slot.bucket, "shape": list(slot.shape),
                "dim_order": list(slot.dim_order), "dtype": str(bucket.dtype),
                "range": [slot.start, slot.end],
                "owned": [slot.start + first, slot.start + last],
                "shard_range": [offset, offset + last - first]}
        buckets = [{"group": b.group, "dtype": str(b.dtype), "numel": b.numel,
                    "padded_numel": b.padded_numel, "shard_offset": b.shard_offset,
                    "owned": list(b.owned(self.rank))} for b in self.buckets]
        return {"params": params, "buckets": buckets}

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard (tensors are references, as in torch optimizers):

        format, world_size, rank, stage, optimizer_class: identify the run.
        param_groups: per group its hyperparameters and "param_names".
        params: name -> group, bucket, shape, dim_order, dtype, range (elements [start, end)
            in the bucket), owned (the part of range this rank owns) and shard_range (where
            that part lies in the rank's flat shard of the group).
        buckets: group, dtype, numel, padded_numel, shard_offset, owned.
        state: per group {"master": fp32 flat shard, **inner optimizer state of that shard}:
            the group's bucket masters end to end (references when a group has one bucket and
            its master is not a slice of the parameters; copies otherwise).
        """
        return {
            "format": STATE_DICT_FORMAT, "world_size": self.world_size, "rank": self.rank,
            "stage": self.stage, "optimizer_class": class_path(type(self.inner)),
            "param_groups": [{**self._hyperparameters(g), "param_names": list(g["param_names"])}
                             for g in self.param_groups],
            **self.layout(),
            "state": [self._group_state(i) for i in range(len(self.param_groups))],
        }

    def _group_state(self, group_index: int) -> dict[str, Any]:
        """The group's masters and their inner state, each as one flat shard of the group."""
        masters = self._group_masters(group_index)
        states = [self.inner.state.get(m, {}) for m in masters]
        state = {"master": _concat(masters, self.device)}
        for key, value in (states[0] if states else {}).items():
            state[key] = (_concat([s[key] for s in states], self.device) if is_per_element(value, masters[0].shape)
                          else value)
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from this rank's shard of a run at the same world size and layout."""
        self.wait_for_parameters()  # a running gather reads the masters this overwrites
        if state_dict.get("format") != STATE_DICT_FORMAT:
            raise ValueError(f"not a ZeroOptimizer state_dict (format {state_dict.get('format')!r}, "
                             f"expected {STATE_DICT_FORMAT!r})")
        if state_dict["world_size"] != self.world_size or state_dict["rank"] != self.rank:
            raise ValueError(f"state_dict is rank {state_dict['rank']} of world size {state_dict['world_size']}, "
                             f"this is rank {self.rank} of {self.world_size}: reshard it with "
                             "consolidate() and shard_from_full()")
        if state_dict["optimizer_class"] != class_path(type(self.inner)):
            raise ValueError(f"state_dict holds {state_dict['optimizer_class']} state, this optimizer "
                             f"is {class_path(type(self.inner))}")
        mine = self.layout()
        for key in ("params", "buckets"):
            if state_dict[key] != mine[key]:
                raise ValueError(f"state_dict's {key} layout differs from this optimizer's (other "
                                 "parameters, groups or bucket_cap_mb): reshard it with consolidate() "
                                 "and shard_from_full()")
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update(self._hyperparameters(saved))
        for bucket, master in zip(self.buckets, self.masters):
            saved = state_dict["state"][bucket.group]
            shard = saved["master"].shape
            part = slice(bucket.shard_offset, bucket.shard_offset + bucket.shard_numel)
            master.copy_(saved["master"][part])
            self.inner.state[master] = {
                k: (v[part] if is_per_element(v, shard) else v).detach().clone().to(master.device)
                if torch.is_tensor(v) else v for k, v in saved.items() if k != "master"}
        self._gather_parameters()


def _concat(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """One flat tensor of `tensors`: the tensor itself when it is one that owns its memory
    (a slice of a parameter bucket would save the whole bucket), else a copy."""
    if len(tensors) == 1 and tensors[0]._base is None:
        return tensors[0]
    return torch.cat(tensors) if tensors else torch.zeros(0, device=device)
