"""VSGD's fused execution path: one kernel call updates a whole list of tensors, on CPU
(`vsgd_cpu`, C++) and CUDA (`vsgd_triton`, Triton).

The kernel reads param, grad and state once and writes them once (36 bytes per fp32 element).
It shares one division between mu and sigma2, so it agrees with the unfused path
(`vsgd_update`) to ~1e-7 relative per step. `FusedVSGD` is owned by one optimizer
(`VSGD.fused_path`) and holds what it keeps across steps:

- per bucket (group, device, dtypes) a `KeptTable`: the kernel's pointers and sizes, rebuilt
  only when an address, a size or a gradient's layout changes;
- per group a `GroupPlan`: what a step reads when the group is one bucket, so that such a step
  checks addresses and launches (host work per step on ResNet-50's 161 tensors: see
  `python bench/ivon_step.py --host`).

Where the kernel cannot run (no compiler, fp64 on CUDA) it answers False and the optimizer
takes the unfused path; a build failure is warned about once per optimizer.
"""
from __future__ import annotations

import logging
import operator
from itertools import repeat
from typing import Callable

import torch

from vsgd_dist.distributed import local_tensor
from vsgd_dist.optim.vsgd_update import StepScalars, flat_views

logger = logging.getLogger(__name__)
_grad = operator.attrgetter("grad")  # a C-level read per tensor


def _kernel(device: torch.device, param_dtype, grad_dtype, state_dtype) -> tuple | None:
    """(table type, the dtype its operands must have: None for any) of the fused kernel for
    these tensors, or None where there is none (fp64 on CUDA: the foreach path)."""
    if device.type == "cpu":
        from vsgd_dist.optim import vsgd_cpu

        return vsgd_cpu.CpuTable, state_dtype  # the C++ kernel computes in one type
    from vsgd_dist.optim import vsgd_triton  # Triton: imported where a CUDA list steps

    if not {param_dtype, grad_dtype} <= vsgd_triton.SUPPORTED or state_dtype != torch.float32:
        return None
    return vsgd_triton.TritonTable, None


class KeptTable:
    """A fused kernel's table (pointers and sizes) of one list of tensors, kept across steps
    while the tensors' identity holds, so that such a step reads addresses and launches. A
    table type is made from (param, grad, mug, bg, bhg) tuples of one dense layout and has
    `launch(scalars, first)`; tensors that do not fit go through contiguous copies, written
    back after the launch (and then the table is rebuilt each step: `identity` is None)."""

    def __init__(self, table_type: type, operand_dtype: torch.dtype | None):
        self.table_type, self.operand_dtype = table_type, operand_dtype
        self.table = None
        self.identity: tuple | None = None

    @staticmethod
    def identity_of(columns: tuple[list[torch.Tensor], ...]) -> tuple:
        """What must not change for a table to stay valid: every tensor's address, the sizes,
        and the gradients' strides (parameters and state keep theirs while their address
        holds). `columns`: the lists of params, grads, mugs, bgs, bhgs."""
        params, grads = columns[0], columns[1]
        return (*(t.data_ptr() for column in columns for t in column), *(p.numel() for p in params),
                *(g.stride() for g in grads))

    def update(self, columns: tuple[list[torch.Tensor], ...], scalars: tuple[float, ...], first: bool) -> None:
        columns = tuple([local_tensor(t) for t in column] for column in columns)
        identity_now, back = self.identity_of(columns), []
        if self.table is None or identity_now != self.identity:
            operands = []
            for tensors in zip(*columns):
                if not (_one_dense_layout(tensors)
                        and (self.operand_dtype is None or all(t.dtype == self.operand_dtype for t in tensors))):
                    tensors, staged = _kernel_operands(tensors, self.operand_dtype)
                    back += staged
                operands.append(tuple(tensors))
            self.table, self.identity = self.table_type(operands), None if back else identity_now
        self.table.launch(scalars, first)
        for destination, copy in back:
            destination.copy_(copy)


def _one_dense_layout(tensors) -> bool:
    """Element k of each tensor's memory is the same element of each, with no gaps (the
    common case, checked without building views)."""
    param, grad, mug, bg, bhg = tensors
    stride = param.stride()
    return (grad.stride() == stride == mug.stride() == bg.stride() == bhg.stride()
            and (param.is_contiguous() or param.is_contiguous(memory_format=torch.channels_last)))


def _kernel_operands(tensors, dtype: torch.dtype | None) -> tuple[list[torch.Tensor], list[tuple]]:
    """1-D operands for a fused kernel, and the (destination, copy) pairs to write back: when
    the layouts differ, or param/grad are not of `dtype` (None: any), contiguous copies."""
    flat = flat_views(tensors)
    if flat is not None and (dtype is None or all(t.dtype == dtype for t in flat)):
        return flat, []
    staged = [local_tensor(t).to(dtype=dtype or t.dtype, memory_format=torch.contiguous_format) for t in tensors]
    back = [(local_tensor(tensors[i]), staged[i]) for i in (0, 2, 3, 4) if staged[i] is not local_tensor(tensors[i])]
    return [t.view(-1) for t in staged], back


class GroupPlan:
    """A fused group's step while nothing but the step count changed: the same parameters at
    the same addresses, the same state dicts (a reload or an engine replaces them), one step
    count `t` for all and a kept table without staged copies. The step counts are views of one
    tensor (`counts`), so a step adds 1 to all at once (161 separate counters: ~0.12 ms); they
    stay per-parameter tensors for checkpoints."""

    def __init__(self, params: list, states: list[dict], t: int, kept: KeptTable, grads: list):
        self.params, self.states, self.t, self.kept = list(params), states, t, kept
        self.param_ptrs = [p.data_ptr() for p in params]
        self.grad_ptrs = list(map(torch.Tensor.data_ptr, grads))
        self.grad_strides = list(map(torch.Tensor.stride, grads))
        self.counts = torch.stack([state["step"] for state in states])
        for i, state in enumerate(states):
            state["step"] = self.counts[i]

    def holds(self, params: list, state: dict) -> bool:
        """Whether a group's `params` are the plan's, at its addresses, with its entries of the
        optimizer's `state` (each parameter has its own state dict: the same dicts in the same
        order are the same parameters)."""
        return (len(params) == len(self.params) and all(map(operator.is_, map(state.__getitem__, params), self.states))
                and list(map(torch.Tensor.data_ptr, params)) == self.param_ptrs)

    def step(self, grads: list, group: dict) -> None:
        """Count the step and launch; first rebuild the table where a gradient moved (`grads`
        have the plan's strides, so the table needs no staged copies)."""
        self.counts.add_(1)
        self.t += 1
        scalars = StepScalars.of(group, self.t)
        values = scalars.fused_values(group["maximize"])
        ptrs = list(map(torch.Tensor.data_ptr, grads))
        if ptrs == self.grad_ptrs:
            self.kept.table.launch(values, scalars.first)
            return
        columns = (self.params, grads, *([state[key] for state in self.states] for key in ("mug", "bg", "bhg")))
        self.kept.update(columns, values, scalars.first)
        self.grad_ptrs = ptrs


class FusedVSGD:
    """The fused kernel of one VSGD optimizer and what it keeps across steps."""

    def __init__(self) -> None:
        self.tables: dict[tuple, KeptTable | None] = {}  # bucket key -> its table (None: no kernel for it)
        self.plans: dict[int, GroupPlan] = {}  # group index -> its plan
        self.unavailable = ""  # why the kernel cannot be built here (warned once); empty: it can
        self.kernel_for: Callable = _kernel

    def forget_tables(self) -> None:
        """Drop every kept table and plan (the state tensors were replaced, e.g. by load_state_dict)."""
        self.tables.clear()
        self.plans.clear()

    def step_planned(self, index: int, group: dict, state: dict) -> bool:
        """Group `index`'s step on its plan: one launch; False, having changed nothing, where
        there is none or it no longer holds (the caller then drops it and steps bucket by bucket)."""
        plan = self.plans.get(index)
        if plan is None or not plan.holds(group["params"], state):
            return False
        grads = list(map(_grad, plan.params))
        # A sparse gradient reports zero strides, which no planned (dense) gradient has.
        if any(map(operator.is_, grads, repeat(None))) or list(map(torch.Tensor.stride, grads)) != plan.grad_strides:
            return False
        plan.step(grads, group)
        return True

    def step(self, key: tuple, columns: tuple[list[torch.Tensor], ...], scalars: StepScalars, maximize: bool) -> bool:
        """Update one bucket (the lists of params, grads, mugs, bgs, bhgs) with the fused kernel;
        False, having written nothing, where it cannot run here. `key` names the bucket's kept
        table; it holds the device and dtypes that choose the kernel."""
        if self.unavailable:
            return False
        try:
            if key not in self.tables:
                params, grads, mugs = columns[:3]
                kernel = self.kernel_for(params[0].device, params[0].dtype, grads[0].dtype, mugs[0].dtype)
                self.tables[key] = kernel and KeptTable(*kernel)
            if self.tables[key] is None:
                return False
            self.tables[key].update(columns, scalars.fused_values(maximize), scalars.first)
            return True
        except Exception as e:  # noqa: BLE001 - any build failure: the unfused path computes the same
            self.unavailable = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            logger.warning("VSGD: fused kernel unavailable (%s); using the unfused path", self.unavailable)
            return False

    def keep_plan(self, index: int, key: tuple, params: list, states: list[dict], t: int) -> None:
        """After a group stepped as the one bucket `key` with every parameter's gradient: plan
        its next steps, where its table was kept (no staged copies) and the tensors are plain."""
        kept = self.tables.get(key)
        if (kept is None or kept.identity is None or any(local_tensor(p) is not p for p in params)
                or len({state["step"].device for state in states}) != 1):
            return
        self.plans[index] = GroupPlan(params, states, t, kept, [p.grad for p in params])
