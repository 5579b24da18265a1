"""VSGD against the spec: known answers, an independent float64 reference, code paths that
must agree, the optimizer API, sharding invariance and convergence on real data."""
import io

import pytest
import torch

from vsgd_dist import VSGD
from vsgd_dist.optim.vsgd_diagnostics import diagnostic_fields, diagnostic_means, diagnostic_sums
from vsgd_dist.spawn import run_distributed

PATHS = {"per_tensor": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


# ---------------------------------------------------------------- independent reference
class SpecReference:
    """The update of vsgd-spec.md, line by line, in float64 (deliberately no shared code)."""

    def __init__(self, shapes, lr, ghattg=30.0, ps=1e-8, tau1=0.81, tau2=0.9, eps=1e-8, wd=0.0):
        self.lr, self.kg, self.ps, self.tau1, self.tau2, self.eps, self.wd = lr, ghattg, ps, tau1, tau2, eps, wd
        self.A = 2 * ps + 1 + 1e-4
        self.bg0, self.bh0 = 2 * ps, 2 * ghattg * ps
        self.mu = [torch.zeros(s, dtype=torch.float64) for s in shapes]
        self.bg = [torch.zeros(s, dtype=torch.float64) for s in shapes]
        self.bh = [torch.zeros(s, dtype=torch.float64) for s in shapes]
        self.t = 0

    def step(self, thetas, grads):
        self.t += 1
        t = self.t
        out = []
        for i, (theta, ghat) in enumerate(zip(thetas, grads)):
            theta = theta * (1 - self.lr * self.wd)
            if t == 1:
                vg = torch.full_like(theta, self.bg0 / (self.A - 1))
                vh = torch.full_like(theta, self.bh0 / (self.A - 1))
            else:
                vg, vh = self.bg[i] / self.A, self.bh[i] / self.A
            mu_prev = self.mu[i]
            mu = (ghat * vg + mu_prev * vh) / (vg + vh)
            sigma2 = vg * vh / (vg + vh)
            m2 = sigma2 + mu ** 2
            bg_new = self.bg0 + sigma2 + (mu - mu_prev) ** 2
            bh_new = self.bh0 + sigma2 + (mu - ghat) ** 2
            rho1, rho2 = t ** (-self.tau1), t ** (-self.tau2)
            self.bg[i] = (1 - rho1) * self.bg[i] + rho1 * bg_new
            self.bh[i] = (1 - rho2) * self.bh[i] + rho2 * bh_new
            self.mu[i] = mu
            out.append(theta - self.lr * mu / (torch.sqrt(m2) + self.eps))
        return out


ODD_SHAPES = [(7, 13), (5,), (3, 1, 4), (1,), (2, 3, 5, 2)]


def random_run(opt_kwargs, dtype, steps, seed=0, shapes=ODD_SHAPES, lr=0.05, wd=0.01):
    """Parameters after `steps` VSGD steps on seeded random gradients of varying scale."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]
    opt = VSGD(params, lr=lr, weight_decay=wd, **opt_kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1 + 0.02).to(dtype)
        opt.step()
    return params, opt


# ----------------------------------------------------------------------- known answers
@pytest.mark.parametrize("path", PATHS)
def test_known_answers_scalar_weight(path):
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = VSGD([w], lr=1.0, **PATHS[path])
    moves, betas = [], []
    for _ in range(5):
        before = w.item()
        w.grad = torch.full_like(w, 1e-2)
        opt.step()
        moves.append(before - w.item())
        s = opt.state[w]
        betas.append((s["bhg"] / (s["bg"] + s["bhg"])).item())
    assert moves == pytest.approx([0.0231830, 0.3648108, 0.5735528, 0.6839658, 0.7451113], abs=6e-8)
    assert betas == pytest.approx([0.598, 0.575, 0.565, 0.559, 0.556], abs=6e-4)


def test_constants_are_double_precision():
    # In float32, A - 1 = 2*ps + 1e-4 rounds and shifts the first step (the reference code's
    # 0.0231826); exact constants give 0.0231830 even on float32 tensors.
    w = torch.zeros(1, requires_grad=True)
    opt = VSGD([w], lr=1.0)
    w.grad = torch.full_like(w, 1e-2)
    opt.step()
    assert -w.item() == pytest.approx(0.0231830, abs=2e-7)


# ------------------------------------------------------------ reference over many steps
@pytest.mark.parametrize("path", PATHS)
def test_matches_float64_reference_over_300_steps(path):
    gen = torch.Generator().manual_seed(1)
    shapes = ODD_SHAPES
    thetas = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    ref = SpecReference(shapes, lr=0.05, wd=0.01)
    params = [t.clone().requires_grad_() for t in thetas]
    opt = VSGD(params, lr=0.05, weight_decay=0.01, **PATHS[path])
    for _ in range(300):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) * 0.1 + 0.02 for s in shapes]
        thetas = ref.step(thetas, grads)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    for p, t in zip(params, thetas):
        torch.testing.assert_close(p.detach(), t, rtol=1e-10, atol=1e-12)
    for i, p in enumerate(params):
        torch.testing.assert_close(opt.state[p]["mug"], ref.mu[i], rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(opt.state[p]["bg"], ref.bg[i], rtol=1e-9, atol=1e-20)
        torch.testing.assert_close(opt.state[p]["bhg"], ref.bh[i], rtol=1e-9, atol=1e-20)


def test_float32_tracks_float64_reference():
    p32, _ = random_run({}, torch.float32, steps=200)
    p64, _ = random_run({}, torch.float64, steps=200)
    for a, b in zip(p32, p64):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------- paths that agree
def test_foreach_equals_per_tensor_bitwise_on_cpu():
    a, _ = random_run(PATHS["per_tensor"], torch.float32, steps=100)
    b, _ = random_run(PATHS["foreach"], torch.float32, steps=100)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_fused_close_to_per_tensor():
    # The fused kernel shares one division between mu and sigma2 (and on CUDA Inductor may
    # contract multiply-adds); stated tolerance: 1e-5 relative after 100 fp32 steps (one step
    # agrees to ~1e-7; measured after 100: params 3e-6, states 2e-5 relative).
    a, oa = random_run(PATHS["per_tensor"], torch.float32, steps=100)
    b, ob = random_run(PATHS["fused"], torch.float32, steps=100)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for x, y in zip(a, b):
        for key in ("mug", "bg", "bhg"):
            torch.testing.assert_close(oa.state[x][key], ob.state[y][key], rtol=1e-4, atol=1e-9)


# ------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("path", ["per_tensor", "foreach", "fused"])
def test_flat_uneven_shards_equal_unsharded(path):
    """A flattened bucket split at arbitrary element boundaries, each slice its own
    parameter, gives the unsharded result element for element. The cuts fall inside the C++
    kernel's 16-lane vectors and 64-element blocks, so its vector and scalar code must agree."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in [*ODD_SHAPES, (37, 41)]]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    bounds = [0, 11, 12, 60, 1001, flat.numel()]  # uneven, crossing tensor boundaries
    shards = [flat[a:b].clone().requires_grad_() for a, b in zip(bounds, bounds[1:])]
    opt_full = VSGD(params, lr=0.03, weight_decay=0.1, **PATHS[path])
    opt_shard = VSGD(shards, lr=0.03, weight_decay=0.1, **PATHS[path])
    for _ in range(50):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        flat_grad = torch.cat([g.reshape(-1) for g in grads])
        for s, a, b in zip(shards, bounds, bounds[1:]):
            s.grad = flat_grad[a:b].clone()
        opt_full.step()
        opt_shard.step()
    full = torch.cat([p.detach().reshape(-1) for p in params])
    assert torch.equal(full, torch.cat([s.detach() for s in shards]))


def _dtensor_worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(s, generator=gen) for s in [(7, 3), (5,)]]
    grads = [[torch.randn(t.shape, generator=gen) for t in full] for _ in range(10)]
    out = {}
    for name, kwargs in PATHS.items():
        plain = [t.clone().requires_grad_() for t in full]
        dparams = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
        o1, o2 = VSGD(plain, lr=0.1, **kwargs), VSGD(dparams, lr=0.1, **kwargs)
        for step_grads in grads:
            for p, d, g in zip(plain, dparams, step_grads):
                p.grad = g.clone()
                d.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            o1.step()
            o2.step()
        out[name] = all(torch.equal(p.detach(), d.detach().full_tensor()) for p, d in zip(plain, dparams))
    return out


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_dtensor_parameters_equal_plain_tensors():
    results = run_distributed(_dtensor_worker, 2, timeout=100)
    assert results[0] == {"per_tensor": True, "foreach": True, "fused": True}


# ------------------------------------------------------------------- mixed precision
def test_bf16_params_keep_fp32_state_and_fp32_math():
    p16, opt = random_run({}, torch.bfloat16, steps=20)
    for p in p16:
        assert p.dtype == torch.bfloat16
        assert all(opt.state[p][k].dtype == torch.float32 for k in ("mug", "bg", "bhg"))
    # state survives a state_dict round trip without being rounded to bf16
    sd = opt.state_dict()
    fresh = VSGD(p16, lr=0.05, weight_decay=0.01)
    fresh.load_state_dict(sd)
    for p in p16:
        assert fresh.state[p]["mug"].dtype == torch.float32
        assert torch.equal(fresh.state[p]["bg"], opt.state[p]["bg"])


def test_state_dtype_float64_on_float32_params():
    p, opt = random_run(dict(state_dtype=torch.float64), torch.float32, steps=3)
    assert opt.state[p[0]]["mug"].dtype == torch.float64 and p[0].dtype == torch.float32


# ------------------------------------------------------------------------ optimizer API
def test_state_dict_round_trip_resumes_bit_identically():
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=gen) for s in ODD_SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in ODD_SHAPES] for _ in range(30)]

    def make(params):
        return VSGD([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.1, "lr": 0.02}], lr=0.05)

    def apply(params, opt, step_grads):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()

    ref = [t.clone().requires_grad_() for t in init]
    ref_opt = make(ref)
    for g in grads:
        apply(ref, ref_opt, g)

    first = [t.clone().requires_grad_() for t in init]
    opt = make(first)
    for g in grads[:12]:
        apply(first, opt, g)
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = [t.clone().requires_grad_() for t in saved["params"]]
    opt2 = make(resumed)
    opt2.load_state_dict(saved["opt"])
    assert int(opt2.state[resumed[0]]["step"]) == 12
    for g in grads[12:]:
        apply(resumed, opt2, g)
    for a, b in zip(ref, resumed):
        assert torch.equal(a, b)


def test_step_is_per_parameter_and_grads_missing_are_skipped():
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(2, requires_grad=True)
    opt = VSGD([a, b], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()
    after_first_step = a[0].item()
    assert torch.equal(b, torch.ones(2)) and len(opt.state[b]) == 0
    b.grad = torch.ones(2)
    opt.step()
    assert int(opt.state[a]["step"]) == 2 and int(opt.state[b]["step"]) == 1
    # b's t is its own: its first step uses the prior, exactly like a's first step did
    assert b[0].item() == after_first_step != a[0].item()


def test_closure_zero_grad_and_add_param_group():
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    opt = VSGD([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(5.0)
    opt.zero_grad()
    assert w.grad is None
    extra = torch.ones(4, requires_grad=True)
    opt.add_param_group({"params": [extra], "lr": 0.5, "tau1": 0.5})
    assert opt.param_groups[1]["ghattg"] == 30.0 and opt.param_groups[1]["tau1"] == 0.5
    with pytest.raises(ValueError, match="tau2"):
        opt.add_param_group({"params": [torch.ones(1, requires_grad=True)], "tau2": 1.5})


def test_lr_scheduler_drives_the_step_size():
    def run(with_scheduler):
        w = torch.ones(4, requires_grad=True)
        opt = VSGD([w], lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) if with_scheduler else None
        for i in range(4):
            if not with_scheduler:
                opt.param_groups[0]["lr"] = 0.1 * 0.5 ** i
            w.grad = torch.full((4,), 0.3)
            opt.step()
            if sched:
                sched.step()
        return w.detach()

    assert torch.equal(run(True), run(False))
    assert not torch.equal(run(True), torch.ones(4))


@pytest.mark.parametrize("path", PATHS)
def test_maximize_equals_negated_gradient(path):
    a = torch.ones(5, requires_grad=True)
    b = torch.ones(5, requires_grad=True)
    oa, ob = VSGD([a], lr=0.1, maximize=True, **PATHS[path]), VSGD([b], lr=0.1, **PATHS[path])
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        g = torch.randn(5, generator=gen)
        a.grad, b.grad = g.clone(), -g
        oa.step()
        ob.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name,value,fragment", [
    ("lr", -0.1, r"lr=-0.1; allowed range is \[0, inf\)"),
    ("ghattg", 0.0, r"ghattg=0.0; allowed range is \(0, inf\)"),
    ("ps", -1e-8, r"ps=-1e-08; allowed range is \(0, inf\)"),
    ("tau1", 0.0, r"tau1=0.0; allowed range is \(0, 1\]"),
    ("tau2", 1.01, r"tau2=1.01; allowed range is \(0, 1\]"),
    ("eps", 0.0, r"eps=0.0; allowed range is \(0, inf\)"),
    ("weight_decay", -1.0, r"weight_decay=-1.0; allowed range is \[0, inf\)"),
    ("lr", float("nan"), r"lr=nan"),
])
def test_bad_hyperparameters_raise_value_error(name, value, fragment):
    with pytest.raises(ValueError, match=fragment):
        VSGD([torch.ones(1, requires_grad=True)], **{name: value})


def test_bad_state_dtype_and_exclusive_paths():
    with pytest.raises(ValueError, match="state_dtype"):
        VSGD([torch.ones(1, requires_grad=True)], state_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="exclusive"):
        VSGD([torch.ones(1, requires_grad=True)], foreach=True, fused=True)


# ---------------------------------------------------------------------- diagnostics
def test_diagnostics_match_spec_formulas_and_add_across_slices():
    params, opt = random_run({}, torch.float64, steps=10)
    p = params[0]
    s, g = opt.state[p], opt.param_groups[0]
    A = 2 * g["ps"] + 1 + 1e-4
    vg, vh = s["bg"] / A, s["bhg"] / A
    sigma2 = vg * vh / (vg + vh)
    fields = diagnostic_fields(s["mug"], s["bg"], s["bhg"], lr=g["lr"], eps=g["eps"], ps=g["ps"], ghattg=g["ghattg"])
    torch.testing.assert_close(fields["snr"], s["mug"] ** 2 / sigma2)
    torch.testing.assert_close(fields["posterior_std"], sigma2.sqrt())
    torch.testing.assert_close(fields["implied_beta1"], s["bhg"] / (s["bg"] + s["bhg"]))
    torch.testing.assert_close(fields["effective_step"], g["lr"] / ((sigma2 + s["mug"] ** 2).sqrt() + g["eps"]))

    whole = opt.diagnostic_sums(p)
    assert whole.dtype == torch.float64 and whole[0].item() == p.numel()
    kw = dict(lr=g["lr"], eps=g["eps"], ps=g["ps"], ghattg=g["ghattg"])
    flat = [s[k].reshape(-1) for k in ("mug", "bg", "bhg")]
    parts = diagnostic_sums(*(t[:40] for t in flat), **kw) + diagnostic_sums(*(t[40:] for t in flat), **kw)
    torch.testing.assert_close(parts, whole)
    means = diagnostic_means(whole)
    assert set(means) == {"snr", "posterior_std", "implied_beta1", "effective_step"}
    assert 0 < means["implied_beta1"] < 1
    assert opt.diagnostic_sums(torch.ones(2, requires_grad=True)) is None


# ---------------------------------------------------------------------- convergence
def _digits_accuracy(make_optimizer, seed, steps=300):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = make_optimizer(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = train[torch.randint(len(train), (32,), generator=gen)]
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (model(x[test]).argmax(1) == y[test]).float().mean().item()


@pytest.mark.parametrize("lr", [3e-3, 1e-2])
def test_vsgd_reaches_adamw_accuracy_on_digits(lr):
    """Same MLP, lr, batch and 300 steps on scikit-learn's digits, mean of 3 seeds.
    Measured: lr 3e-3 VSGD 0.948 vs AdamW 0.940; lr 1e-2 VSGD 0.960 vs AdamW 0.961
    (held-out 397 images, so 0.005 is two images: the stated tolerance)."""
    vsgd = sum(_digits_accuracy(lambda p: VSGD(p, lr=lr), s) for s in range(3)) / 3
    adamw = sum(_digits_accuracy(lambda p: torch.optim.AdamW(p, lr=lr), s) for s in range(3)) / 3
    assert vsgd > 0.93
    assert vsgd >= adamw - 0.005, (vsgd, adamw)
