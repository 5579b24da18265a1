"""IVON: Improved Variational Online Newton (Shen et al., arXiv 2402.17641).

IVON learns a diagonal Gaussian posterior N(m_w, sigma^2) over the weights, sigma^2 =
1 / (ess * (h + weight_decay)), trains at weight samples and estimates the Hessian h from
the same gradients. The update rule, line by line, is `_single_tensor_update`; docs/kernels.md
describes the fused kernels and the noise.

One optimizer step (the parameters hold m_w between steps):

    for k in range(mc_samples):
        opt.sample(k)          # params <- m_w + eps_k, eps_k = z_k * sigma; m_w and eps_k kept
        loss_fn(model(x)).backward()
        opt.accumulate()       # only needed before a further sample: moves .grad into sums
    opt.step()                 # takes the last gradient, restores m_w and updates m, h, m_w

`step(closure)` runs that loop itself; `restore()` puts m_w back without an update (after
evaluating the posterior predictive at samples). Between `sample` and `step` the optimizer
holds a copy of m_w (param dtype) and eps (state dtype), plus for mc_samples > 1 the sums of
g and g*eps; between steps only m and h (8 bytes per fp32 parameter, like Adam).

The noise: z_k of element i is `noise.standard_normal(seed, t, k, i)`, t = the parameter's
step count + 1, i = the element's *global index*: by default the optimizer's parameters (all
groups, in order) laid end to end, each in its memory order; a DTensor sharded on dim 0 (FSDP2)
counts with its global shape and its local shard finds its own offset. An engine that holds
other pieces (a ZeRO rank's flat slice) says where they lie with `set_global_offset(tensor,
offset)`: an int (the tensor's elements are offset, offset + 1, ...) or runs [(start, length),
...] in the tensor's memory order. Then the same element draws the same z at any world size.
`sample(k, z=[...])` takes the standard-normal draws directly instead (known-answer tests,
comparisons with another implementation).

In training runs the engines do this (`vsgd_dist.engines.sampling.WeightSampling`, through
the `Sampler` of the registry entry `optimizer=ivon`): `zero` runs IVON on each rank's flat
fp32 master shard and all-gathers m_w + eps (`ZeroOptimizer.sample`), `fsdp2` on the local
DTensor shards, `ddp` on replicas that all draw the same eps. BatchNorm's running statistics are updated by every training
forward, so they are those of the weight samples (mc_samples updates per step), as in the
authors' code. `evaluation=True` samples (posterior predictive) use `evaluation_seed`.

Everything after the backward is elementwise (`elementwise = True`): a flat slice gives the
numbers of the whole tensor, given the same eps and gradient. Three paths compute the step:
per-tensor (`foreach=False`), multi-tensor (`foreach=True`, the same ops as `torch._foreach_*`,
bitwise equal on CPU) and `fused=True` (`ivon_fused`): one kernel call draws a whole group's
sample and one steps a whole bucket (C++ on CPU, Triton on CUDA, no torch.compile). The fused
sample is bitwise the unfused one on CPU; the fused step rounds differently from torch's ops
(torch fuses some multiply-adds), so it agrees with the others to float rounding. Where no
fused kernel takes the tensors (bf16 parameters, other devices) the unfused path runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch.optim import Optimizer

from vsgd_dist.distributed import local_tensor
from vsgd_dist.optim.ivon_fused import FusedIVON, GroupPlan
from vsgd_dist.optim.noise import check_counter, normal_from_index, sqrt_rn, standard_normal
from vsgd_dist.optim.registry import OPTIMIZERS, Diagnostics, OptimizerEntry, Sampler
from vsgd_dist.sharding.layout import memory_dim_order, to_memory_flat

__all__ = ["IVON", "IVONHparams", "evaluation_seed"]

_STATE_KEYS = ("m", "h")
_HESS_APPROX = ("price", "gradsq")


def evaluation_seed(seed: int) -> int:
    """The noise seed of posterior-predictive samples for training seed `seed`: seed + 2**62
    (mod 2**63), so evaluation draws never repeat a training draw of small seeds."""
    return (seed + 2 ** 62) % 2 ** 63


def _check_range(name: str, value, interval: str) -> None:
    """Raise unless `value` is a real number in `interval`, written like "[0, inf)"."""
    low, high = (float(x) for x in interval[1:-1].split(","))
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = (value >= low if interval[0] == "[" else value > low) and \
             (value <= high if interval[-1] == "]" else value < high)
    if not ok:
        raise ValueError(f"IVON: invalid {name}={value!r}; allowed range is {interval}")


def _validate_group(group: dict) -> None:
    _check_range("lr", group["lr"], "[0, inf)")
    _check_range("ess", group["ess"], "(0, inf)")
    _check_range("hess_init", group["hess_init"], "(0, inf)")
    _check_range("beta1", group["beta1"], "[0, 1)")
    _check_range("beta2", group["beta2"], "[0, 1)")
    _check_range("weight_decay", group["weight_decay"], "[0, inf)")
    _check_range("clip_radius", group["clip_radius"], "(0, inf]")
    mc, seed = group["mc_samples"], group["seed"]
    if not isinstance(mc, int) or isinstance(mc, bool) or mc < 1:
        raise ValueError(f"IVON: invalid mc_samples={mc!r}; allowed: an int >= 1")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"IVON: invalid seed={seed!r}; allowed: an int in [0, 2**63)")
    if group["hess_approx"] not in _HESS_APPROX:
        raise ValueError(f"IVON: invalid hess_approx={group['hess_approx']!r}; allowed: 'price' or 'gradsq'")
    for name in ("rescale_lr", "debias"):
        if not isinstance(group[name], bool):
            raise ValueError(f"IVON: invalid {name}={group[name]!r}; allowed: True or False")
    if group["foreach"] and group["fused"]:
        raise ValueError("IVON: foreach=True and fused=True are exclusive; pick one")


@dataclass(frozen=True)
class _StepScalars:
    """Everything the elementwise update needs besides tensors, in double precision."""

    lr: float  # alpha' = lr * (hess_init + weight_decay) with rescale_lr
    ess: float
    wd: float
    beta1: float
    beta2: float
    c: float  # (1 - beta2)^2 / 2, the weight of the positivity correction
    bias: float  # 1 - beta1^t with debias, else 1
    clip: float
    n: int  # MC samples behind the gradient
    single: bool  # gradient of one sample, statistic not yet formed (g*eps or g*g)
    price: bool

    @staticmethod
    def of(group: dict, t: int, n: int, single: bool) -> "_StepScalars":
        wd, beta1, beta2 = group["weight_decay"], group["beta1"], group["beta2"]
        lr = group["lr"] * (group["hess_init"] + wd if group["rescale_lr"] else 1.0)
        return _StepScalars(lr=lr, ess=float(group["ess"]), wd=float(wd), beta1=beta1, beta2=beta2,
                            c=0.5 * (1.0 - beta2) ** 2, bias=1.0 - beta1 ** t if group["debias"] else 1.0,
                            clip=float(group["clip_radius"]), n=n, single=single,
                            price=group["hess_approx"] == "price")

    def fused_values(self) -> tuple[float, ...]:
        """The fused kernels' scalars (`ivon_fused.STEP_SCALARS`), in double precision."""
        return (self.lr, self.ess, self.wd, self.beta1, 1.0 - self.beta1, self.beta2, 1.0 - self.beta2, self.c,
                self.bias, self.clip, float(self.n))


class IVON(Optimizer):
    """IVON with the hyperparameter names and defaults of the authors' code.

    Args:
        params: parameters or param groups (every hyperparameter can be overridden per group).
        lr: learning rate alpha (SGD-like scale with rescale_lr).
        ess: effective sample size lambda, usually the training set size.
        hess_init: initial h.
        beta1: gradient momentum; beta2: Hessian averaging.
        weight_decay: delta, also the prior precision (enters sigma and the denominator).
        mc_samples: weight samples (forward/backward passes) per step.
        hess_approx: 'price' (h_hat = ess * (h + delta) * mean(g * eps)) or 'gradsq'
            (h_hat = ess * mean(g^2)).
        clip_radius: elementwise clip of the preconditioned step.
        rescale_lr: use alpha' = alpha * (hess_init + delta).
        debias: divide the momentum by 1 - beta1^t.
        seed: of the counter-based noise (saved with the param groups, so a resume redraws
            the same noise).
        foreach: multi-tensor step; None picks it when the parameters are on CUDA.
        fused: one kernel call per sample and per step bucket (fastest; the C++ kernel builds
            once per machine, in about a second).
    State per parameter: m, h (fp32 for bf16/fp16 parameters, else the parameter's dtype)
    and `step`.
    """

    elementwise = True  # after the backward every element depends only on itself

    def __init__(self, params: Iterable, lr: float, ess: float, hess_init: float = 1.0, beta1: float = 0.9,
                 beta2: float = 0.99999, weight_decay: float = 1e-4, mc_samples: int = 1,
                 hess_approx: str = "price", clip_radius: float = math.inf, rescale_lr: bool = True,
                 debias: bool = True, *, seed: int = 0, foreach: bool | None = None,
                 fused: bool | None = None):
        defaults = dict(lr=lr, ess=ess, hess_init=hess_init, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, mc_samples=mc_samples, hess_approx=hess_approx,
                        clip_radius=clip_radius, rescale_lr=rescale_lr, debias=debias, seed=seed,
                        foreach=foreach, fused=fused)
        self._offsets: dict[torch.Tensor, list[tuple[int, int]]] = {}
        self._stash: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = {}  # param -> (mean, eps)
        self._sums: dict[torch.Tensor, list] = {}  # param -> [sum g, sum g*eps (or g*g), count]
        self._drawn = 0  # samples drawn this step
        self._accumulated = 0  # gradients moved into the sums this step
        self._pending = False  # a sample whose gradient is not accumulated yet
        self._global_runs: dict[torch.Tensor, list[tuple[int, int]]] | None = None  # cache of _runs()
        self.fused_path = FusedIVON()  # kernels, tables and sample buffers of fused=True groups
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._global_runs = None
        if hasattr(self, "fused_path"):  # not yet during __init__
            self.fused_path.plans.clear()
        group = self.param_groups[-1]
        _validate_group(group)
        if group["mc_samples"] != self.param_groups[0]["mc_samples"]:
            raise ValueError(f"IVON: invalid mc_samples={group['mc_samples']!r}; every group draws the "
                             f"same samples, so it must equal {self.param_groups[0]['mc_samples']}")

    # ---------------------------------------------------------------------------- state
    def _init_state(self, group: dict, param: torch.Tensor) -> dict:
        dtype = param.dtype if param.dtype in (torch.float32, torch.float64) else torch.float32
        state = self.state[param]
        state["m"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        state["h"] = torch.full_like(param, group["hess_init"], dtype=dtype, memory_format=torch.preserve_format)
        state["step"] = torch.tensor(0, dtype=torch.int64)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load keeping fp32 state for bf16 parameters (torch would cast it to bf16)."""
        saved_state = state_dict["state"]
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        self.fused_path.forget_tables()
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            for param, param_id in zip(group["params"], saved_group["params"]):
                if param_id in saved_state:
                    state = self._init_state(group, param)
                    for key in _STATE_KEYS:
                        state[key].copy_(saved_state[param_id][key])
                    state["step"] = torch.as_tensor(saved_state[param_id]["step"], dtype=torch.int64).clone()

    # -------------------------------------------------------------------- noise indices
    def set_global_offset(self, tensor: torch.Tensor, offset: int | Sequence[tuple[int, int]]) -> None:
        """Where `tensor`'s elements (its local part, in memory order) lie in the global index
        space of the noise: an int, or runs [(start, length), ...] covering all of them.

        ZeRO: a rank's flat master of a group is, bucket by bucket, the owned parts of slots;
        a slot part [first, last) of parameter j is the run (base_j + first, last - first),
        base_j = the numel of all parameters before j in the unsharded optimizer's order (what
        that optimizer uses by default). Bucket padding may take any indices (its noise is unused).
        """
        runs = [(offset, local_tensor(tensor).numel())] if isinstance(offset, int) else [tuple(r) for r in offset]
        if sum(length for _, length in runs) != local_tensor(tensor).numel() or any(s < 0 or n < 0 for s, n in runs):
            raise ValueError(f"IVON: global offset runs {runs} must be non-negative and cover the tensor's "
                             f"{local_tensor(tensor).numel()} local elements")
        self._offsets[tensor] = runs
        self._global_runs = None
        self.fused_path.plans.clear()

    def _runs(self) -> dict[torch.Tensor, list[tuple[int, int]]]:
        """Each parameter's runs of global indices (kept until an offset or a group changes)."""
        if self._global_runs is None:
            runs, base = {}, 0
            for group in self.param_groups:
                for p in group["params"]:
                    runs[p] = self._offsets.get(p) or [(base + _dtensor_local_start(p), local_tensor(p).numel())]
                    base += p.numel()  # a DTensor's global numel
            self._global_runs = runs
        return self._global_runs

    # ------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, mc_sample: int = 0, *, z: Sequence[torch.Tensor] | None = None,
               seed: int | None = None, evaluation: bool = False) -> None:
        """Write a weight sample m_w + eps into the parameters, eps = z * sigma.

        z: standard-normal draws, one tensor per parameter (param_groups order, local shape);
            default: the counter-based draw for (seed, the parameter's step + 1, mc_sample, index).
        seed: instead of the group's.
        evaluation: a posterior-predictive sample, drawn with `evaluation_seed(group seed)`, so
            it never repeats a training step's noise (restore() afterwards, no step).
        """
        params = [p for group in self.param_groups for p in group["params"]]
        if z is not None and len(z) != len(params):
            raise ValueError(f"IVON.sample: z has {len(z)} tensors for {len(params)} parameters")
        runs = self._runs() if z is None else None
        index = 0
        for group_index, group in enumerate(self.param_groups):
            key = group["seed"] if seed is None else seed
            key = evaluation_seed(key) if evaluation else key
            if z is None and group["fused"] and self._sample_fused(group_index, group, runs, key, mc_sample):
                index += len(group["params"])
                continue
            for p in group["params"]:
                state = self.state[p] or self._init_state(group, p)
                if p not in self._stash:  # the first sample of the step: keep m_w
                    self._stash[p] = (local_tensor(p).detach().clone(memory_format=torch.preserve_format),
                                      torch.empty_like(local_tensor(state["h"]), memory_format=torch.preserve_format))
                mean, eps = self._stash[p]
                views = [_flat(t) for t in (p, state["h"], mean, eps)]
                if z is not None:
                    _sample_eager(*views, _flat(z[index], local_tensor(p)).to(eps.dtype), group)
                else:
                    counter = (key, int(state["step"]) + 1, mc_sample)
                    z_runs = _standard_normal_runs(counter, runs[p], eps.device, eps.dtype, self.fused_path)
                    _sample_eager(*views, z_runs, group)
                index += 1
        self._drawn += 1
        self._pending = True

    def _sample_fused(self, group_index: int, group: dict, runs: dict, seed: int, mc_sample: int) -> bool:
        """The group's sample in one kernel call per step count (one, unless some parameter
        missed steps); False, having changed nothing, where the fused kernels do not take it."""
        fused, by_step = self.fused_path, {}
        keep_mean = not group["params"] or group["params"][0] not in self._stash
        plan = fused.plans.get(group_index)
        if plan is not None and plan.valid_for(group["params"]):
            plan.sample_table.launch(seed, plan.t + 1, mc_sample, group["ess"], group["weight_decay"], keep_mean)
            self._stash.update(plan.stash)
            return True
        for p in group["params"]:
            state = self.state[p] or self._init_state(group, p)
            local = local_tensor(p)
            mean, eps = self._stash.get(p) or fused.buffers_of(p, local, local_tensor(state["h"]))
            by_step.setdefault(int(state["step"]) + 1, []).append((p, mean, eps, state))
        buckets = {}
        for step, members in by_step.items():
            items = buckets[step] = [(_flat(p), _flat(state["h"]), _flat(mean, local_tensor(p)), _flat(eps, local_tensor(p)),
                                      runs[p]) for p, mean, eps, state in members]
            for *_, param_runs in items:
                for start, n in param_runs:
                    check_counter(seed, step, mc_sample, start, n)
            if not fused.accepts(items):
                return False
        for ordinal, step in enumerate(by_step):  # the table's key: not the step, which changes
            if not fused.sample((group_index, ordinal), buckets[step], (seed, step, mc_sample), group["ess"],
                                group["weight_decay"], keep_mean):
                return False  # only where the kernel cannot be built: then nothing has run
            for p, mean, eps, _ in members:
                self._stash[p] = (mean, eps)
        kept = fused.sample_tables.get((group_index, 0))
        if len(by_step) == 1 and kept is not None and kept.table is not None:
            [(step, members)] = by_step.items()
            flat = {name: [item[i] for item in buckets[step]] for i, name in enumerate(("param", "h", "mean", "eps"))}
            flat["m"] = [_flat(state["m"]) for *_, state in members]
            # The step counts become views of one tensor, so that a step adds 1 to all at once
            # (161 separate counters took ~0.1 ms); they stay per-parameter tensors for checkpoints.
            counts = torch.stack([state["step"] for *_, state in members])
            for i, (*_, state) in enumerate(members):
                state["step"] = counts[i]
            fused.plans[group_index] = GroupPlan(
                list(group["params"]), [p.data_ptr() for p in group["params"]], counts, step - 1,
                {p: (mean, eps) for p, mean, eps, _ in members}, kept.table, flat, group["hess_approx"] == "price")
        return True

    @torch.no_grad()
    def accumulate(self) -> None:
        """Move the current sample's gradients into per-step sums and clear `.grad`, so the
        next backward starts from zero (needed only when another sample follows)."""
        if not self._pending:
            raise RuntimeError("IVON.accumulate: no sample to accumulate; call sample() before the forward")
        price = {p: g["hess_approx"] == "price" for g in self.param_groups for p in g["params"]}
        for p, (_, eps) in self._stash.items():
            if p.grad is None:
                continue
            g = _flat(p.grad, local_tensor(p)).to(eps.dtype, copy=True)  # .grad may be a reused buffer
            stat = g * _flat(eps) if price[p] else g * g
            if p in self._sums:
                sums = self._sums[p]
                sums[0].add_(g)
                sums[1].add_(stat)
                sums[2] += 1
            else:
                self._sums[p] = [g, stat, 1]
            p.grad = None
        self._accumulated += 1
        self._pending = False

    @torch.no_grad()
    def restore(self) -> None:
        """Put the mean weights back and forget the samples of this step (no update)."""
        for p, (mean, _) in self._stash.items():
            local_tensor(p).copy_(mean)
        self._clear()

    def _clear(self) -> None:
        self._stash = {}
        self._sums = {}
        self._drawn = self._accumulated = 0
        self._pending = False

    # ----------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            mc = self.param_groups[0]["mc_samples"]
            for k in range(mc):
                self.sample(k)
                with torch.enable_grad():
                    loss = closure()
                if k + 1 < mc:
                    self.accumulate()
        if not self._stash:
            if any(p.grad is not None for g in self.param_groups for p in g["params"]):
                raise RuntimeError("IVON.step: the gradient must come from a weight sample: call "
                                   "sample() before the forward (see the module docstring)")
            return loss
        if self._pending and self._sums:
            self.accumulate()
        mc = self.param_groups[0]["mc_samples"]
        gradients = self._accumulated + self._pending
        if self._drawn != mc or gradients != mc:
            raise RuntimeError(f"IVON.step: drew {self._drawn} samples and took {gradients} gradients, "
                               f"but mc_samples={mc}: call sample(k) for k < mc_samples and accumulate() "
                               "after each backward but the last")
        for index, group in enumerate(self.param_groups):
            self._step_group(index, group)
        self._clear()
        return loss

    def _step_group(self, index: int, group: dict) -> None:
        if group["fused"] and self._step_planned(index, group):
            return
        self.fused_path.plans.pop(index, None)  # the steps below change what a plan kept
        # Bucket by everything a single multi-tensor call must share.
        buckets: dict[tuple, list[tuple]] = {}
        for p in group["params"]:
            if p not in self._stash:
                continue
            mean, eps = self._stash[p]
            if p in self._sums:
                g, stat, n = self._sums[p]
                single = False
            elif p.grad is not None:
                g, n, single = _flat(p.grad, local_tensor(p)), 1, True
                stat = _flat(eps) if group["hess_approx"] == "price" else g
            else:
                local_tensor(p).copy_(mean)  # no gradient, no update: back to the mean
                continue
            state = self.state[p]
            state["step"] += 1
            key = (p.device, p.dtype, eps.dtype, int(state["step"]), n, single)
            buckets.setdefault(key, []).append((_flat(p), _flat(mean), g, stat, _flat(state["m"]),
                                                _flat(state["h"])))
        for ordinal, ((device, _, _, t, n, single), items) in enumerate(buckets.items()):
            scalars = _StepScalars.of(group, t, n, single)
            columns = [list(c) for c in zip(*items)]
            if group["fused"] and self.fused_path.step((index, ordinal), columns,
                                                       scalars.fused_values(), single, scalars.price):
                continue
            if group["foreach"] or (group["foreach"] is None and device.type == "cuda"):
                _foreach_update(*columns, scalars)
            else:
                for item in items:
                    _single_tensor_update(*item, scalars)


    def _step_planned(self, index: int, group: dict) -> bool:
        """The fused step of a group whose sample ran on its plan, from one sample's gradients:
        one kernel launch; False where the general path must run."""
        plan = self.fused_path.plans.get(index)
        if plan is None or self._sums or self._drawn != 1 or plan.params[0] not in self._stash:
            return False
        grads = [p.grad for p in plan.params]
        if any(g is None for g in grads):  # not `None in grads`: that compares tensors with None
            return False
        table = plan.step_table_for(grads, self.fused_path.kernels_for)
        if table is None:
            return False
        plan.steps.add_(1)  # every parameter's state["step"] is a view of it
        plan.t += 1
        scalars = _StepScalars.of(group, plan.t, 1, True)
        table.launch(scalars.fused_values(), True, scalars.price)
        return True


# =============================================================================== helpers
def _flat(tensor: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """1-D view of a (local) tensor in the memory order of `like` (default: itself)."""
    tensor = local_tensor(tensor)
    like = tensor if like is None else like
    if like.dim() <= 1:
        return tensor.reshape(-1)
    return to_memory_flat(tensor, memory_dim_order(like, "given to IVON"))


def _dtensor_local_start(param: torch.Tensor) -> int:
    """Global flat index of a DTensor's first local element (0 for a plain tensor)."""
    if not hasattr(param, "placements"):
        return 0
    from torch.distributed.tensor import Replicate, Shard

    from vsgd_dist.compat.torch import dtensor_global_offset
    if not all(isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0) for pl in param.placements):
        raise ValueError(f"IVON: a DTensor with placements {param.placements} is not one contiguous run "
                         "of global elements; give its indices with set_global_offset()")
    offset = dtensor_global_offset(param)
    return offset[0] * (param.numel() // param.shape[0]) if param.dim() else 0


# ============================================================================== sampling
def _standard_normal_runs(counter: tuple, runs: list[tuple[int, int]], device, dtype,
                          fused: FusedIVON) -> torch.Tensor:
    """z for the elements of `runs`, in one pass over all of them (a ZeRO shard has a run
    per parameter piece): the numbers of one `standard_normal` per run, concatenated."""
    for start, n in runs:
        check_counter(*counter, start, n)
    if torch.device(device).type == "cpu" and (z := fused.cpu_normals(counter, runs)) is not None:
        return z.to(dtype)
    if len(runs) == 1:
        return standard_normal(*counter, *runs[0], device=device, dtype=dtype)
    index = torch.cat([torch.arange(start, start + n, dtype=torch.int64, device=device) for start, n in runs])
    return normal_from_index(index, *counter).to(dtype)


def _sample_eager(param, h, mean, eps, z, group: dict) -> None:
    """eps = z * sigma, param = mean + eps (the fused kernels' operations, in their order)."""
    sigma = sqrt_rn((h + group["weight_decay"]).mul_(group["ess"])).reciprocal_()
    torch.mul(z, sigma, out=eps)
    param.copy_(mean.to(eps.dtype) + eps)


# ================================================================================ update
def _single_tensor_update(param, mean, grad, stat, m, h, s: _StepScalars) -> None:
    """The spec's step on 1-D views: `stat` is eps (price) or the gradient (gradsq) when
    `s.single`, else the summed statistic; `grad` is the gradient or the summed gradients."""
    dtype = m.dtype
    g = grad.to(dtype)
    stat = g * stat.to(dtype) if s.single else stat
    if s.n != 1:
        g = g / s.n
        stat = stat / s.n
    hd = h + s.wd
    hhat = hd.mul(s.ess).mul_(stat) if s.price else stat * s.ess
    corr = h - hhat
    corr.mul_(corr).div_(hd).mul_(s.c)
    m.mul_(s.beta1).add_(g, alpha=1.0 - s.beta1)
    h.mul_(s.beta2).add_(hhat, alpha=1.0 - s.beta2).add_(corr)
    w = mean.to(dtype)
    step = m / s.bias
    step.add_(w, alpha=s.wd).div_(h + s.wd)
    if s.clip != math.inf:
        step.clamp_(-s.clip, s.clip)
    w.add_(step, alpha=-s.lr)
    param.copy_(w)


def _foreach_update(params, means, grads, stats, ms, hs, s: _StepScalars) -> None:
    """The same operations as `_single_tensor_update`, in the same order, as foreach ops."""
    dtype = ms[0].dtype
    gs = [g.to(dtype) for g in grads]
    if s.single:
        stats = torch._foreach_mul(gs, [x.to(dtype) for x in stats])
    if s.n != 1:
        gs = torch._foreach_div(gs, s.n)
        stats = torch._foreach_div(stats, s.n)
    hd = torch._foreach_add(hs, s.wd)
    if s.price:
        hhat = torch._foreach_mul(hd, s.ess)
        torch._foreach_mul_(hhat, stats)
    else:
        hhat = torch._foreach_mul(stats, s.ess)
    corr = torch._foreach_sub(hs, hhat)
    torch._foreach_mul_(corr, corr)
    torch._foreach_div_(corr, hd)
    torch._foreach_mul_(corr, s.c)
    torch._foreach_mul_(ms, s.beta1)
    torch._foreach_add_(ms, gs, alpha=1.0 - s.beta1)
    torch._foreach_mul_(hs, s.beta2)
    torch._foreach_add_(hs, hhat, alpha=1.0 - s.beta2)
    torch._foreach_add_(hs, corr)
    ws = [w.to(dtype) for w in means]
    steps = torch._foreach_div(ms, s.bias)
    torch._foreach_add_(steps, ws, alpha=s.wd)
    torch._foreach_div_(steps, torch._foreach_add(hs, s.wd))
    if s.clip != math.inf:
        torch._foreach_clamp_min_(steps, -s.clip)
        torch._foreach_clamp_max_(steps, s.clip)
    torch._foreach_add_(ws, steps, alpha=-s.lr)
    for p, w in zip(params, ws):
        p.copy_(w)


# ======================================================================= registration
@dataclass
class IVONHparams:
    """The recipe's `optim.ivon` section; lr and weight_decay (delta, also the prior
    precision) are the shared `optim.lr` and `optim.weight_decay`, the seed is train.seed."""

    ess: float = 0.0
    """Effective sample size lambda (sigma^2 = 1 / (ess * (h + weight_decay))); 0: the number
    of training images, filled in by the trainer from the dataset."""
    hess_init: float = 1.0
    """Initial Hessian estimate h0: sets the first sigma and, with rescale_lr, the LR scale."""
    beta1: float = 0.9
    """Gradient momentum."""
    beta2: float = 0.99999
    """Hessian averaging."""
    mc_samples: int = 1
    """Weight samples per step, each a forward and backward of the same batch."""
    hess_approx: str = "price"
    """'price' (h_hat = ess * (h + delta) * g * eps, the authors' default) or 'gradsq' (ess * g^2)."""
    clip_radius: float = math.inf
    """Elementwise clip of the preconditioned step (inf: no clip)."""
    rescale_lr: bool = True
    """Use lr * (hess_init + weight_decay) as the step size, so lr has an SGD-like scale."""
    debias: bool = True
    """Divide the momentum by 1 - beta1^t."""


def _diagnostic_fields(m, h, hp: dict) -> dict:
    h = h.to(torch.promote_types(h.dtype, torch.float32))
    return {"posterior_std": ((h + hp["weight_decay"]) * hp["ess"]).rsqrt(), "hessian": h}


DIAGNOSTICS = Diagnostics(_STATE_KEYS, _diagnostic_fields, {
    "posterior_std": ("log10", -8.0, 2.0),
    "hessian": ("log10", -8.0, 6.0),
})
"""Per layer: the posterior std sigma and the Hessian estimate h."""

SAMPLER = Sampler(sample=lambda opt, mc_sample, evaluation=False: opt.sample(mc_sample, evaluation=evaluation),
                  accumulate=IVON.accumulate, mean_weights=IVON.restore, set_global_offset=IVON.set_global_offset)
OPTIMIZERS.register("ivon", OptimizerEntry(IVON, IVONHparams, diagnostics=DIAGNOSTICS, sampler=SAMPLER,
                                           engines=("ddp", "zero", "fsdp2"), train_size_field="ess"))
