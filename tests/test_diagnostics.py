"""Diagnostics of the implicit meta-gradient, the Gauss–Newton curvature, the
inner solvers' tolerance and Nesterov's solver, against independent dense
float64 computations and finite differences."""
import warnings

import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.func import hessian, jacrev

import imaml_ext as im
from imaml_ext import diagnostics
from imaml_ext.functional import TaskLoss
from imaml_ext.hvp import make_gnvp
from imaml_ext.inner import solve_gd, solve_nesterov
from imaml_ext.solvers import CGState

LAM = 2.0


def half_mse(out, target):
    return 0.5 * ((out.squeeze(-1) - target) ** 2).mean()


def tanh_net(seed=0, dim=2, hidden=4, out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, out)).double()


def tasks(T=3, n=8, m=6, dim=2, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, n, dim, generator=g, dtype=torch.float64)
    ys = torch.randint(0, classes, (T, n), generator=g)
    xq = torch.randn(T, m, dim, generator=g, dtype=torch.float64)
    yq = torch.randint(0, classes, (T, m), generator=g)
    return xs, ys, xq, yq


def flat_grad(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def query_loss(tl, phi, xq, yq):
    """Σ_t CE of task t's query set (sum over tasks, mean over examples)."""
    return tl.losses(phi, xq, yq).sum()


@pytest.fixture
def fresh_warning(monkeypatch):
    """The once-per-process flag reset for one test."""
    monkeypatch.setattr(diagnostics, "_warned", False)


# ---------------------------------------------------------------- residual and CG diagnostics

def test_residual_is_the_stationarity_residual_at_the_last_evaluated_iterate():
    model = tanh_net()
    xs, ys, _, _ = tasks()
    K, lr = 7, 0.3
    adapted = im.imaml(model, xs, ys, F.cross_entropy, lam=LAM, inner_steps=K, inner_lr=lr)
    tl = TaskLoss(model, F.cross_entropy)
    theta = tl.theta().detach()
    # Independent: plain GD written out, K - 1 steps, then the residual by autograd.
    phi = theta.repeat(xs.shape[0], 1)
    for _ in range(K - 1):
        p = phi.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(tl.losses(p, xs, ys).sum(), p)
        phi = phi - lr * (g + LAM * (phi - theta))
    p = phi.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(tl.losses(p, xs, ys).sum(), p)
    expected = (g + LAM * (phi - theta)).norm(dim=1)
    p0 = theta.repeat(xs.shape[0], 1).requires_grad_(True)
    (g0,) = torch.autograd.grad(tl.losses(p0, xs, ys).sum(), p0)
    torch.testing.assert_close(adapted.info["residual_norm"], expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(adapted.info["residual_at_theta"], g0.norm(dim=1), rtol=1e-10, atol=0)
    torch.testing.assert_close(adapted.info["residual"], expected / g0.norm(dim=1), rtol=1e-10, atol=0)
    assert adapted.info["inner_steps_taken"].tolist() == [K] * xs.shape[0]


def test_cg_min_curvature_is_the_rayleigh_quotient_of_its_directions():
    g = torch.Generator().manual_seed(0)
    P = 6
    q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    eig = torch.tensor([[3.0, 2.0, 1.5, 1.0, 0.5, 0.2], [2.0, 1.0, 0.5, -0.3, -1.0, 0.7]], dtype=torch.float64)
    mats = q @ torch.diag_embed(eig) @ q.T
    rhs = torch.randn(2, P, generator=g, dtype=torch.float64)

    def matvec(v):
        return torch.einsum("tij,tj->ti", mats, v)

    one = im.cg(matvec, rhs, max_iter=1)
    first = (rhs * matvec(rhs)).sum(1) / (rhs * rhs).sum(1)  # the first direction is rhs
    torch.testing.assert_close(one.min_curvature, first, rtol=1e-12, atol=0)
    many = im.cg(matvec, rhs, max_iter=P + 2, tol=1e-10)
    # PD task: every Rayleigh quotient lies in [λ_min, λ_max]; it converges.
    assert eig[0].min() - 1e-12 <= many.min_curvature[0] <= first[0] + 1e-12
    assert many.state[0] == CGState.CONVERGED
    # Indefinite task: CG stops on pᵀAp ≤ 0 and the quotient says so.
    assert many.state[1] == CGState.NONPOSITIVE_CURVATURE
    assert many.min_curvature[1] <= 0


def test_imaml_records_curvature_per_task():
    model = tanh_net()
    xs, ys, xq, yq = tasks()
    # A shifted operator A = 1·I − 5·H is indefinite wherever H has an eigenvalue > 0.2.
    adapted = im.imaml(model, xs, ys, F.cross_entropy, lam=LAM, inner_steps=50, inner_lr=0.3,
                       operator=(1.0, -5.0), cg_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", im.ImplicitGradientWarning)
        query_loss(adapted.task_loss, adapted.flat, xq, yq).backward()
    info = adapted.info
    assert torch.equal(info["nonpositive_curvature"], info["cg"].state == CGState.NONPOSITIVE_CURVATURE)
    assert bool(info["nonpositive_curvature"].all())
    assert bool((info["min_rayleigh"] <= 0).all())


def test_warning_once_with_counts_and_silenceable(fresh_warning):
    model = tanh_net()
    xs, ys, xq, yq = tasks()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # 1 inner step leaves the residual at ~1: unsolved
            adapted = im.imaml(model, xs, ys, F.cross_entropy, lam=LAM, inner_steps=1, inner_lr=0.01)
            query_loss(adapted.task_loss, adapted.flat, xq, yq).backward()
    mine = [w for w in caught if issubclass(w.category, im.ImplicitGradientWarning)]
    assert len(mine) == 1
    text = str(mine[0].message)
    assert "3 of 3 tasks" in text and "inner_steps" in text
    assert ("gauss_newton" in text) == bool(adapted.info["nonpositive_curvature"].any())
    assert adapted.info["residual"].median() > diagnostics.RESIDUAL_WARN_THRESHOLD


def test_warning_advises_for_the_problem_found(fresh_warning):
    """An unsolved inner problem under the Gauss–Newton matrix (positive definite A):
    the advice is about the inner solve, not the curvature already in use."""
    model = tanh_net()
    xs, ys, xq, yq = tasks()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapted = im.imaml(model, xs, ys, F.cross_entropy, lam=LAM, inner_steps=1, inner_lr=0.01,
                           curvature="gauss_newton")
        query_loss(adapted.task_loss, adapted.flat, xq, yq).backward()
    (warning,) = [w for w in caught if issubclass(w.category, im.ImplicitGradientWarning)]
    text = str(warning.message)
    assert not bool(adapted.info["nonpositive_curvature"].any())
    assert "not solved" in text and "inner_steps" in text and "gauss_newton" not in text


def test_warning_filtered_and_not_raised_when_solved(fresh_warning):
    model = tanh_net()
    xs, ys, xq, yq = tasks()
    with warnings.catch_warnings():
        warnings.simplefilter("error", im.ImplicitGradientWarning)
        adapted = im.imaml(model, xs, ys, F.cross_entropy, lam=LAM, inner_steps=60, inner_lr=0.3,
                           inner_solver="nesterov", cg_steps=20)
        query_loss(adapted.task_loss, adapted.flat, xq, yq).backward()  # solved: no error
        assert adapted.info["residual"].max() < diagnostics.RESIDUAL_WARN_THRESHOLD
        assert not bool(adapted.info["nonpositive_curvature"].any())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", im.ImplicitGradientWarning)
        adapted = im.imaml(model, xs, ys, F.cross_entropy, inner_steps=1, inner_lr=0.01)
        query_loss(adapted.task_loss, adapted.flat, xq, yq).backward()  # silenced: no error


# ---------------------------------------------------------------- Gauss–Newton

@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_gauss_newton_product_equals_explicit_jt_hz_j(loss):
    model = tanh_net(out=3 if loss == "ce" else 1)
    xs, ys, _, _ = tasks(T=2, n=5)
    if loss == "ce":
        loss_fn = F.cross_entropy
    else:
        loss_fn, ys = half_mse, torch.randn(2, 5, dtype=torch.float64)
    tl = TaskLoss(model, loss_fn)
    T, P = 2, tl.layout.numel
    phi = tl.theta().detach().repeat(T, 1) + 0.1 * torch.randn(T, P, dtype=torch.float64)
    v = torch.randn(T, P, dtype=torch.float64)
    got = make_gnvp(tl.per_task_outputs, loss_fn, phi, xs, ys)(v)
    for t in range(T):
        z = tl.per_task_outputs(phi[t], xs[t])
        J = jacrev(lambda p: tl.per_task_outputs(p, xs[t]))(phi[t]).reshape(z.numel(), P)
        Hz = hessian(lambda zz: loss_fn(zz.reshape(z.shape), ys[t]))(z.flatten())
        G = J.T @ Hz @ J
        torch.testing.assert_close(got[t], G @ v[t], rtol=1e-10, atol=1e-12)
        assert torch.linalg.eigvalsh(G).min() > -1e-10  # PSD


def test_gauss_newton_equals_hessian_for_a_linear_model_with_mse():
    torch.manual_seed(0)
    model = nn.Linear(4, 1).double()
    xs = torch.randn(3, 7, 4, dtype=torch.float64)
    ys = torch.randn(3, 7, dtype=torch.float64)
    tl = TaskLoss(model, half_mse)
    phi = tl.theta().detach().repeat(3, 1)
    v = torch.randn(3, tl.layout.numel, dtype=torch.float64)
    torch.testing.assert_close(im.hvp(tl.per_task, phi, xs, ys, v),
                               make_gnvp(tl.per_task_outputs, half_mse, phi, xs, ys)(v), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_meta_gradient_equals_explicit_float64_solve(curvature):
    model = tanh_net(seed=3)
    xs, ys, xq, yq = tasks(seed=3)
    adapted = im.imaml(model, xs, ys, F.cross_entropy, lam=LAM, inner_steps=100, inner_lr=0.3,
                       inner_solver="nesterov", cg_steps=60, cg_tol=1e-14, curvature=curvature)
    tl = adapted.task_loss
    query_loss(tl, adapted.flat, xq, yq).backward()
    got = flat_grad(model)
    phi = adapted.flat.detach()
    P = phi.shape[1]
    expected = torch.zeros(P, dtype=torch.float64)
    for t in range(phi.shape[0]):
        if curvature == "hessian":
            M = hessian(lambda p: tl.per_task(p, xs[t], ys[t]))(phi[t])
        else:
            z = tl.per_task_outputs(phi[t], xs[t])
            J = jacrev(lambda p: tl.per_task_outputs(p, xs[t]))(phi[t]).reshape(z.numel(), P)
            M = J.T @ hessian(lambda zz: F.cross_entropy(zz.reshape(z.shape), ys[t]))(z.flatten()) @ J
        p = phi[t].clone().requires_grad_(True)
        (gq,) = torch.autograd.grad(tl.per_task(p, xq[t], yq[t]), p)
        expected += torch.linalg.solve(torch.eye(P, dtype=torch.float64) + M / LAM, gq)
    assert (got - expected).norm() / expected.norm() < 1e-9


def test_implicit_gradient_matches_finite_differences_through_a_converged_inner_solve():
    model = tanh_net(seed=5)
    xs, ys, xq, yq = tasks(seed=5)
    kw = dict(lam=LAM, inner_steps=25, inner_solver="hf", inner_cg_steps=40)
    adapted = im.imaml(model, xs, ys, F.cross_entropy, cg_steps=60, cg_tol=1e-13, **kw)
    assert adapted.info["residual"].max() < 1e-8
    query_loss(adapted.task_loss, adapted.flat, xq, yq).backward()
    got = flat_grad(model)
    theta = adapted.task_loss.theta().detach()

    def meta_loss(th):
        torch.nn.utils.vector_to_parameters(th, model.parameters())
        with torch.no_grad():
            a = im.imaml(model, xs, ys, F.cross_entropy, **kw)
            return float(query_loss(a.task_loss, a.flat.detach(), xq, yq))

    g = torch.Generator().manual_seed(0)
    eps = 1e-5
    for _ in range(3):
        u = torch.randn(theta.shape, generator=g, dtype=torch.float64)
        fd = (meta_loss(theta + eps * u) - meta_loss(theta - eps * u)) / (2 * eps)
        assert abs(fd - float(got @ u)) <= 1e-6 * max(1.0, abs(fd))


def test_gauss_newton_hf_inner_solver_reaches_ridge_solution():
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(4, 12, 5, generator=g, dtype=torch.float64)
    ys = torch.randn(4, 12, generator=g, dtype=torch.float64)
    model = nn.Linear(5, 1, bias=False).double()
    theta = model.weight.detach().flatten().clone()
    adapted = im.imaml(model, xs, ys, half_mse, lam=LAM, inner_solver="hf", inner_steps=2,
                       inner_cg_steps=12, curvature="gauss_newton")
    H = xs.transpose(1, 2) @ xs / 12
    ref = torch.linalg.solve(H + LAM * torch.eye(5, dtype=torch.float64),
                             (xs.transpose(1, 2) @ ys.unsqueeze(-1)).squeeze(-1) / 12 + LAM * theta)
    torch.testing.assert_close(adapted.flat.detach(), ref, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- Nesterov and the tolerance

def ridge_problem():
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(3, 20, 6, generator=g, dtype=torch.float64) * torch.linspace(0.3, 3.0, 6, dtype=torch.float64)
    ys = torch.randn(3, 20, generator=g, dtype=torch.float64)
    model = nn.Linear(6, 1, bias=False).double()
    tl = TaskLoss(model, half_mse)
    theta = tl.theta().detach()
    H = xs.transpose(1, 2) @ xs / 20
    ref = torch.linalg.solve(H + 0.1 * torch.eye(6, dtype=torch.float64),
                             (xs.transpose(1, 2) @ ys.unsqueeze(-1)).squeeze(-1) / 20 + 0.1 * theta)
    return tl, theta, xs, ys, ref


def test_nesterov_reaches_the_regularised_solution_in_fewer_steps_than_gd():
    tl, theta, xs, ys, ref = ridge_problem()  # λ = 0.1, κ = L/μ ≈ 50
    lr = 1.0 / (torch.linalg.eigvalsh(xs.transpose(1, 2) @ xs / 20).max().item() + 0.1)
    fast = solve_nesterov(tl, theta, xs, ys, lam=0.1, steps=300, lr=lr)
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-12)
    err = {}
    for name, solver in (("gd", solve_gd), ("nesterov", solve_nesterov)):
        err[name] = (solver(tl, theta, xs, ys, lam=0.1, steps=60, lr=lr) - ref).norm() / ref.norm()
    assert err["nesterov"] < 0.1 * err["gd"]


@pytest.mark.parametrize("solver", [solve_gd, solve_nesterov])
def test_tolerance_stops_each_task_where_its_residual_is_small(solver):
    tl, theta, xs, ys, ref = ridge_problem()
    xs = xs * torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)[:, None, None]  # unlike conditioning
    lam, lr, tol, steps = 0.5, 0.05, 1e-3, 600
    found = {}
    phi = solver(tl, theta, xs, ys, lam=lam, steps=steps, lr=lr, tol=tol, diagnostics=found)
    taken = found["steps_taken"]
    assert bool((taken < steps).all()) and len(set(taken.tolist())) > 1
    # Independent: the returned point's residual by autograd is below tol·‖∇L̂(θ)‖.
    p = phi.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(tl.losses(p, xs, ys).sum(), p)
    p0 = theta.repeat(3, 1).requires_grad_(True)
    (g0,) = torch.autograd.grad(tl.losses(p0, xs, ys).sum(), p0)
    assert bool(((g + lam * (phi - theta)).norm(dim=1) <= tol * g0.norm(dim=1)).all())
    if solver is solve_gd:  # each task is where `taken[t]` plain steps leave it
        for t in range(3):
            alone = solver(tl, theta, xs[t:t + 1], ys[t:t + 1], lam=lam, steps=int(taken[t]), lr=lr)
            torch.testing.assert_close(phi[t], alone[0], rtol=1e-12, atol=1e-14)


def test_inner_options_are_checked():
    model = tanh_net()
    xs, ys, _, _ = tasks()
    with pytest.raises(ValueError, match="curvature must be one of"):
        im.imaml(model, xs, ys, curvature="fisher")
    with pytest.raises(ValueError, match="inner_momentum is the momentum of inner_solver='nesterov'"):
        im.imaml(model, xs, ys, inner_momentum=0.5)
    with pytest.raises(ValueError, match="must be < 1"):
        im.imaml(model, xs, ys, inner_solver="nesterov", inner_momentum=1.0)
    with pytest.raises(ValueError, match="inner_tol must be a non-negative"):
        im.imaml(model, xs, ys, inner_tol=-1.0)


# ---------------------------------------------------------------- the training application

def test_training_logs_the_diagnostics_at_log_cadence(tmp_path):
    from imaml_ext.training.experiment import make_config
    from imaml_ext.training.metrics import metrics_file, read_metrics
    from imaml_ext.training.train import RunOptions, train
    for method in ("imaml-gd", "fomaml"):
        cfg = make_config("sinusoid", method=method, meta_steps=4, meta_batch=3, inner_steps=2, shots=5,
                          queries=5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", im.ImplicitGradientWarning)
            train(cfg, RunOptions(out_dir=tmp_path / method, progress=False, log_every=2, checkpoint_every=0))
        lines = read_metrics(metrics_file(tmp_path / method))["train"]
        assert [r["step"] for r in lines] == [2, 4]
        for r in lines:
            if method == "fomaml":
                assert "residual_median" not in r
                continue
            assert 0 < r["residual_median"] <= r["residual_max"]
            assert r["nonpositive_tasks"] in range(4) and isinstance(r["min_rayleigh"], float)


def test_training_config_curvature_reaches_the_backward_solve(tmp_path):
    """``--curvature gauss_newton``: A = I + G/λ with G PSD, so every CG Rayleigh quotient
    logged is ≥ 1; the Hessian run of the same configuration meets ones below 1."""
    from imaml_ext.training.experiment import make_config
    from imaml_ext.training.metrics import metrics_file, read_metrics
    from imaml_ext.training.train import RunOptions, train
    smallest = {}
    for curvature in ("gauss_newton", "hessian"):
        cfg = make_config("sinusoid", method="imaml-gd", meta_steps=4, meta_batch=6, inner_steps=3,
                          shots=5, queries=5, cg_steps=8, curvature=curvature)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", im.ImplicitGradientWarning)
            train(cfg, RunOptions(out_dir=tmp_path / curvature, progress=False, log_every=1, checkpoint_every=0))
        lines = read_metrics(metrics_file(tmp_path / curvature))["train"]
        smallest[curvature] = min(r["min_rayleigh"] for r in lines)
        assert all(r["nonpositive_tasks"] == 0 for r in lines) or curvature == "hessian"
    assert smallest["gauss_newton"] >= 1 - 1e-5
    assert smallest["hessian"] < 1 - 1e-3


def test_evaluation_says_how_each_method_adapts_and_how_well_imaml_solved_it():
    from imaml_ext.training.evaluate import evaluate, inner_residual, adapt
    from imaml_ext.training.experiment import build_model, make_config, make_sampler
    for method, text in (("imaml-gd", "7 GD steps of lr 0.02 on L̂(φ) + (λ/2)‖φ − θ‖², λ = 3"),
                         ("imaml-hf", "7 Hessian-free Newton steps (5 CG steps each, hessian curvature)"),
                         ("maml", "7 SGD steps of lr 0.02 on L̂ from θ")):
        cfg = make_config("sinusoid", method=method, inner_steps=7, inner_lr=0.02, lam=3.0, shots=5, queries=5)
        torch.manual_seed(0)
        model = build_model(cfg)
        result = evaluate(cfg, model, make_sampler(cfg, "test", 0), num_tasks=6, batch=3)
        assert text in result["adaptation"]
        if method == "maml":
            assert "inner_residual" not in result
            continue
        sx, sy, _, _ = make_sampler(cfg, "test", 0).sample(3)
        phi = adapt(cfg, model, sx, sy)
        # Independent: the residual of the regularised problem by autograd.
        tl = TaskLoss(model, F.mse_loss)
        theta = tl.theta().detach()
        p = phi.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(tl.losses(p, sx, sy).sum(), p)
        p0 = theta.repeat(3, 1).requires_grad_(True)
        (g0,) = torch.autograd.grad(tl.losses(p0, sx, sy).sum(), p0)
        expected = (g + 3.0 * (phi - theta)).norm(dim=1) / g0.norm(dim=1)
        torch.testing.assert_close(inner_residual(cfg, model, phi, sx, sy), expected, rtol=1e-5, atol=1e-7)
        assert result["inner_residual"] > 0


def test_tolerance_stops_hessian_free_newton_tasks():
    from imaml_ext.inner import solve_hf
    tl, theta, xs, ys, _ = ridge_problem()
    xs = xs * torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)[:, None, None]
    lam, tol, steps = 0.5, 1e-4, 40
    found = {}
    phi = solve_hf(tl, theta, xs, ys, lam=lam, steps=steps, cg_steps=2, tol=tol, diagnostics=found)
    assert bool((found["steps_taken"] < steps).all())
    p = phi.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(tl.losses(p, xs, ys).sum(), p)
    p0 = theta.repeat(3, 1).requires_grad_(True)
    (g0,) = torch.autograd.grad(tl.losses(p0, xs, ys).sum(), p0)
    assert bool(((g + lam * (phi - theta)).norm(dim=1) <= tol * g0.norm(dim=1)).all())
