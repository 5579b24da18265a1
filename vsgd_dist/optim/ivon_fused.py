"""IVON's fused execution path: one kernel call draws a whole group's sample, one call steps
a bucket, on CPU (`ivon_cpu`, C++) and CUDA (`ivon_triton`, Triton).

`FusedIVON` is owned by one optimizer and holds what it keeps across steps:

- the sample buffers (mean weights and eps of every parameter), allocated once, so that the
  kernels' pointer tables stay valid from step to step (the unfused path allocates them per
  step and frees them in `step`; here they stay: 8 bytes more per fp32 parameter between steps);
- the kernel tables (pointers, sizes, global indices of every run), rebuilt only when an
  address, a size or a run changes.

Where a kernel cannot run (a dtype or layout it does not take, no C++ compiler, no Triton), it
answers False and the optimizer takes the unfused path, which computes the same sample
bit for bit (on CPU) and the same update to float rounding; a build failure is warned about once
per optimizer, not remembered for the process.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

logger = logging.getLogger(__name__)

STEP_SCALARS = ("lr", "ess", "wd", "beta1", "keep1", "beta2", "keep2", "c", "bias", "clip", "n")
"""The step kernels' scalars, in their order (`ivon._StepScalars.fused_values`)."""


def _kernels(device: torch.device, dtype: torch.dtype):
    """(sample table type, step table type) for parameters of `dtype` on `device`, or None."""
    if device.type == "cpu":
        from vsgd_dist.optim import ivon_cpu

        return (ivon_cpu.CpuSampleTable, ivon_cpu.CpuStepTable) if dtype in ivon_cpu.SUPPORTED else None
    if device.type == "cuda":
        from vsgd_dist.optim import ivon_triton  # Triton: imported where a CUDA list steps

        return (ivon_triton.TritonSampleTable, ivon_triton.TritonStepTable) if dtype in ivon_triton.SUPPORTED else None
    return None


def _dense_1d(tensor: torch.Tensor) -> bool:
    return tensor.dim() == 1 and tensor.stride(0) == 1


class _Kept:
    """A table kept while `identity` holds."""

    __slots__ = ("identity", "table")

    def __init__(self, identity: tuple, table) -> None:
        self.identity, self.table = identity, table


class GroupPlan:
    """Everything a fused group's sample and one-sample step read, kept while it holds, so that
    such a step checks addresses and launches (host work per step on ResNet-50's 161 tensors:
    see bench/ivon_step.py --host). Valid while the parameters' addresses hold and every
    parameter has the same step count `t`; the optimizer drops it on any other change (a step
    through the general path, load_state_dict, new offsets or groups)."""

    def __init__(self, params: list, param_ptrs: list, steps: torch.Tensor, t: int, stash: dict, sample_table,
                 flat: dict, price: bool) -> None:
        self.params, self.param_ptrs, self.steps, self.t = params, param_ptrs, steps, t
        self.stash, self.sample_table, self.flat, self.price = stash, sample_table, flat, price
        self.grad_ptrs: list | None = None  # the gradients of the kept step table
        self.step_table = None

    def valid_for(self, params: list) -> bool:
        return params == self.params and [p.data_ptr() for p in params] == self.param_ptrs

    def step_table_for(self, grads: list, kernels_for) -> object | None:
        """The step kernel's table for these gradients (kept while their addresses hold), or
        None where a gradient's layout differs from its parameter's (the general path runs)."""
        grad_ptrs = [g.data_ptr() for g in grads]
        if grad_ptrs != self.grad_ptrs:
            if any(g.stride() != p.stride() or g.dtype != p.dtype for g, p in zip(grads, self.params)):
                return None
            flat = self.flat
            grads_flat = [g.view(-1) if g.is_contiguous() else _memory_view(g, p) for g, p in zip(grads, self.params)]
            if any(g is None for g in grads_flat):
                return None
            stats = flat["eps"] if self.price else grads_flat
            operands = list(zip(flat["param"], flat["mean"], grads_flat, stats, flat["m"], flat["h"]))
            kernels = kernels_for(self.params[0].device, self.params[0].dtype)
            self.step_table, self.grad_ptrs = kernels[1](operands), grad_ptrs
        return self.step_table


def _memory_view(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor | None:
    """1-D view of a dense gradient laid out like its parameter, or None."""
    from vsgd_dist.sharding.layout import memory_dim_order, to_memory_flat

    try:
        view = to_memory_flat(grad, memory_dim_order(param, "param"))
    except ValueError:
        return None
    return view if _dense_1d(view) else None


class FusedIVON:
    """The fused kernels of one IVON optimizer and what they keep across steps."""

    def __init__(self) -> None:
        self.buffers: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = {}  # param -> (mean, eps)
        self.sample_tables: dict[tuple, _Kept] = {}
        self.step_tables: dict[tuple, _Kept] = {}
        self.plans: dict[int, GroupPlan] = {}  # group index -> its plan
        self.unavailable = ""  # why the kernels cannot be built here (warned once); empty: they can
        self.kernels_for: Callable = _kernels

    def forget_tables(self) -> None:
        """Drop every kept table and plan (the state tensors were replaced, e.g. by load_state_dict)."""
        self.sample_tables.clear()
        self.step_tables.clear()
        self.plans.clear()

    def buffers_of(self, param: torch.Tensor, local: torch.Tensor, state_h: torch.Tensor):
        """The kept (mean, eps) of `param`, shaped like its local tensor and its h."""
        kept = self.buffers.get(param)
        if kept is None or kept[0].shape != local.shape or kept[0].device != local.device:
            kept = (torch.empty_like(local, memory_format=torch.preserve_format),
                    torch.empty_like(state_h, memory_format=torch.preserve_format))
            self.buffers[param] = kept
        return kept

    # ------------------------------------------------------------------------ sample
    def accepts(self, items: list[tuple]) -> bool:
        """Whether the kernels take these (param, h, mean, eps, runs) items (1-D, dense, one dtype)."""
        dtype = items[0][0].dtype
        return not self.unavailable and all(_dense_1d(t) and t.dtype == dtype for *views, _ in items for t in views)

    def sample(self, key: tuple, items: list[tuple], counter: tuple[int, int, int], ess: float, wd: float,
               keep_mean: bool) -> bool:
        """Draw one group's sample: `items` are (param, h, mean, eps) 1-D views and the param's
        runs [(global start, length), ...]; all share the counter (seed, step, sample).
        keep_mean: the step's first sample (mean <- param first). False, having written nothing,
        where no fused kernel takes them (call `accepts` first for the layouts)."""
        first = items[0][0]
        if not self.accepts(items):
            return False
        identity = tuple((t.data_ptr(), t.numel()) for *views, _ in items for t in views) + \
            tuple(tuple(runs) for *_, runs in items)
        kept = self.sample_tables.get(key)
        if kept is None or kept.identity != identity:
            ranges, firsts = [], []
            for *views, runs in items:
                at = 0
                for start, length in runs:
                    if length:
                        ranges.append(tuple(v[at:at + length] for v in views))
                        firsts.append(start)
                    at += length
            table = self._make(0, first, ranges, firsts) if ranges else None
            if table is False:
                return False
            kept = self.sample_tables[key] = _Kept(identity, table)
        if kept.table is not None:
            kept.table.launch(*counter, ess, wd, keep_mean)
        return True

    # -------------------------------------------------------------------------- step
    def step(self, key: tuple, columns: list[list[torch.Tensor]], scalars: tuple[float, ...], single: bool,
             price: bool) -> bool:
        """Update one bucket: `columns` are the lists of param, mean, grad, stat, m, h (1-D
        views). False, having written nothing, where no fused kernel takes them."""
        dtype = columns[0][0].dtype
        if self.unavailable or any(not (_dense_1d(t) and t.dtype == dtype) for column in columns for t in column):
            return False
        identity = tuple((t.data_ptr(), t.numel()) for column in columns for t in column)
        kept = self.step_tables.get(key)
        if kept is None or kept.identity != identity:
            table = self._make(1, columns[0][0], list(zip(*columns)))
            if table is False:
                return False
            kept = self.step_tables[key] = _Kept(identity, table)
        kept.table.launch(scalars, single, price)
        return True

    def cpu_normals(self, counter: tuple, runs: list[tuple[int, int]]) -> torch.Tensor | None:
        """The float32 z of `runs` from the C++ generator (the numbers `noise.standard_normal`
        gives, without its many torch-ops passes), for unfused samples on CPU; None where the
        kernels cannot be built here (recorded and warned once, like a table's build)."""
        if self.unavailable:
            return None
        try:
            from vsgd_dist.optim import ivon_cpu

            return torch.cat([ivon_cpu.normals(*counter, start, n) for start, n in runs])
        except Exception as e:  # noqa: BLE001 - any build failure: the torch-ops generator gives the same numbers
            self.unavailable = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            logger.warning("IVON: fused kernel unavailable (%s); using the unfused path", self.unavailable)
            return None

    def _make(self, which: int, like: torch.Tensor, *args):
        """A new table of kernel `which` (0: sample, 1: step) for tensors like `like`; False
        where there is none (then the unfused path runs)."""
        try:
            kernels = self.kernels_for(like.device, like.dtype)
            return kernels[which](*args) if kernels else False
        except Exception as e:  # noqa: BLE001 - any build failure: the unfused path computes the same
            self.unavailable = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            logger.warning("IVON: fused kernel unavailable (%s); using the unfused path", self.unavailable)
            return False
