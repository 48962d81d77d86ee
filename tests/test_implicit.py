"""iMAML meta-gradients against closed forms and independent dense computations."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.func import functional_call

import imaml_ext as im
from imaml_ext.adapted import Adapted
from imaml_ext.inner import NonFiniteLossError

LAM = 2.0


def half_mse(out, target):
    return 0.5 * ((out.squeeze(-1) - target) ** 2).mean()


def classification_tasks(T, n_support, n_query, dim, classes):
    """Random float64 tasks: support x ``[T, n_support, dim]``, labels ``[T, n_support]``,
    query x ``[T, n_query, dim]``, labels ``[T, n_query]`` (drawn in that order)."""
    xs, ys = torch.randn(T, n_support, dim, dtype=torch.float64), torch.randint(0, classes, (T, n_support))
    xq, yq = torch.randn(T, n_query, dim, dtype=torch.float64), torch.randint(0, classes, (T, n_query))
    return xs, ys, xq, yq


def ridge_tasks(T=4, d=5, n=12, m=9):
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(T, n, d, generator=g, dtype=torch.float64)
    ys = torch.randn(T, n, generator=g, dtype=torch.float64)
    xq = torch.randn(T, m, d, generator=g, dtype=torch.float64)
    yq = torch.randn(T, m, generator=g, dtype=torch.float64)
    return xs, ys, xq, yq


def ridge_closed_form(theta, xs, ys, xq, yq, lam):
    """φ_t* = (H_t + λI)⁻¹(X_tᵀy_t/n + λθ) with H_t = X_tᵀX_t/n;
    meta-gradient of Σ_t L_t(φ_t*) is Σ_t λ(H_t + λI)⁻¹ ∇L_t(φ_t*)."""
    T, n, d = xs.shape
    eye = torch.eye(d, dtype=theta.dtype)
    H = xs.transpose(1, 2) @ xs / n
    phi = torch.linalg.solve(H + lam * eye, (xs.transpose(1, 2) @ ys.unsqueeze(-1)).squeeze(-1) / n + lam * theta)
    resid = (xq @ phi.unsqueeze(-1)).squeeze(-1) - yq
    grad_q = (xq.transpose(1, 2) @ resid.unsqueeze(-1)).squeeze(-1) / xq.shape[1]
    meta = lam * torch.linalg.solve(H + lam * eye, grad_q)
    return phi, meta.sum(0)


@pytest.mark.parametrize("solver,kw", [
    ("gd", dict(inner_steps=3000, inner_lr=0.2)),
    ("hf", dict(inner_steps=2, inner_cg_steps=12)),
])
def test_ridge_regression_matches_closed_form(solver, kw):
    xs, ys, xq, yq = ridge_tasks()
    model = nn.Linear(5, 1, bias=False).double()
    theta = model.weight.detach().flatten().clone()
    adapted = im.imaml(model, xs, ys, half_mse, lam=LAM, inner_solver=solver,
                       cg_steps=30, cg_tol=1e-14, **kw)
    loss = sum(half_mse(adapted(xq)[t], yq[t]) for t in range(xq.shape[0]))
    loss.backward()
    phi_ref, meta_ref = ridge_closed_form(theta, xs, ys, xq, yq, LAM)
    phi = adapted.flat.detach()
    assert (phi - phi_ref).norm() / phi_ref.norm() < 1e-8
    got = model.weight.grad.flatten()
    assert (got - meta_ref).norm() / meta_ref.norm() < 1e-8


def test_tanh_mlp_matches_dense_inverse():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    T = 3
    xs, ys, xq, yq = classification_tasks(T, 10, 8, 2, 3)
    adapted = im.imaml(model, xs, ys, F.cross_entropy, lam=LAM, inner_steps=300, inner_lr=0.1,
                       cg_steps=100, cg_tol=1e-15)
    F.cross_entropy(adapted(xq).flatten(0, 1), yq.flatten()).backward()
    got = torch.cat([p.grad.flatten() for p in model.parameters()])

    # Independent dense computation at the same φ*.
    tl = adapted.task_loss
    phi = adapted.flat.detach()
    expected = torch.zeros_like(got)
    P = phi.shape[1]
    for t in range(T):
        H = torch.autograd.functional.hessian(lambda p: tl.per_task(p, xs[t], ys[t]), phi[t])
        p = phi[t].clone().requires_grad_(True)
        q_loss = F.cross_entropy(tl._call(p, xq[t]), yq[t], reduction="sum") / (T * 8)
        (gq,) = torch.autograd.grad(q_loss, p)
        expected += torch.linalg.solve(torch.eye(P, dtype=torch.float64) + H / LAM, gq)
    assert (got - expected).norm() / expected.norm() < 1e-9
    assert (adapted.info["cg"].state == im.solvers.CGState.CONVERGED).all()


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_batched_equals_single_task_calls(mode):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    T = 3
    xs, ys, xq, yq = classification_tasks(T, 6, 5, 3, 2)
    kw = dict(lam=1.5, inner_steps=10, inner_lr=0.3, cg_steps=7, hvp_mode=mode)

    adapted = im.imaml(model, xs, ys, F.cross_entropy, **kw)
    sum(F.cross_entropy(adapted(xq)[t], yq[t]) for t in range(T)).backward()
    batched = [p.grad.clone() for p in model.parameters()]
    phis = adapted.flat.detach()

    model.zero_grad()
    for t in range(T):
        single = im.imaml(model, xs[t:t + 1], ys[t:t + 1], F.cross_entropy, **kw)
        torch.testing.assert_close(single.flat.detach()[0], phis[t], rtol=1e-12, atol=1e-13)
        F.cross_entropy(single(xq[t:t + 1])[0], yq[t]).backward()
    for b, s in zip(batched, model.parameters()):
        torch.testing.assert_close(b, s.grad, rtol=1e-10, atol=1e-12)


def test_operator_option_and_imaml_dev_compat():
    """compat='imaml_dev' = GD on L̂, then one pull-back step, and the system
    (1 + d)·I + H/(λ + 10), checked on a ridge problem in closed form (with an
    accurate CG in place of the official one, which stops at rᵀr < 1e-10)."""
    xs, ys, xq, yq = ridge_tasks(T=2)
    model = nn.Linear(5, 1, bias=False).double()
    theta = model.weight.detach().flatten().clone()
    lam, lr, steps, d = 1.0, 0.1, 5, 1.0
    adapted = im.imaml(model, xs, ys, half_mse, lam=lam, inner_steps=steps, inner_lr=lr,
                       linear_solver=im.CG(max_iter=40, tol=1e-14), compat="imaml_dev", cg_damping=d)
    sum(half_mse(adapted(xq)[t], yq[t]) for t in range(2)).backward()

    n = xs.shape[1]
    H = xs.transpose(1, 2) @ xs / n
    b = (xs.transpose(1, 2) @ ys.unsqueeze(-1)).squeeze(-1) / n
    phi = theta.expand(2, -1).clone()
    for _ in range(steps):
        phi = phi - lr * ((H @ phi.unsqueeze(-1)).squeeze(-1) - b)
    phi = phi - lr * lam * (phi - theta)
    torch.testing.assert_close(adapted.flat.detach(), phi, rtol=1e-12, atol=1e-13)
    resid = (xq @ phi.unsqueeze(-1)).squeeze(-1) - yq
    gq = (xq.transpose(1, 2) @ resid.unsqueeze(-1)).squeeze(-1) / xq.shape[1]
    A = (1 + d) * torch.eye(5, dtype=torch.float64) + H / (lam + 10)
    torch.testing.assert_close(model.weight.grad.flatten(), torch.linalg.solve(A, gq).sum(0),
                               rtol=1e-10, atol=1e-12)


def test_memory_graph_free_inner_loop():
    """The adapted buffer's graph has one node from the implicit function,
    whatever the number of inner steps."""
    model = nn.Linear(4, 1).double()
    xs, ys = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    adapted = im.imaml(model, xs, ys, half_mse, inner_steps=50)
    assert type(adapted.flat.grad_fn).__name__.startswith("_ImplicitMetaGrad")


class TestBadInput:
    def setup_method(self):
        self.model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        self.x = torch.randn(2, 5, 3)
        self.y = torch.randint(0, 2, (2, 5))

    def test_mismatched_tasks(self):
        with pytest.raises(ValueError, match="2 tasks but support_y has 3"):
            im.imaml(self.model, self.x, torch.randint(0, 2, (3, 5)))

    def test_missing_task_dimension(self):
        with pytest.raises(ValueError, match="task dimension first"):
            im.imaml(self.model, self.x[0], self.y[0, 0])

    def test_non_floating_parameters(self):
        model = nn.Linear(3, 2)
        model.weight = nn.Parameter(torch.ones(2, 3, dtype=torch.int64), requires_grad=False)
        model.bias.requires_grad_(False)
        with pytest.raises(ValueError, match="no parameters that require grad"):
            im.imaml(model, self.x, self.y)

    def test_mixed_dtypes(self):
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2).double())
        with pytest.raises(TypeError, match="one dtype"):
            im.imaml(model, self.x, self.y)

    @pytest.mark.parametrize("lam", [0.0, -1.0, float("nan")])
    def test_bad_lambda(self, lam):
        with pytest.raises(ValueError, match="lam must be a positive"):
            im.imaml(self.model, self.x, self.y, lam=lam)

    @pytest.mark.parametrize("name", ["inner_steps", "inner_cg_steps"])
    def test_negative_steps(self, name):
        with pytest.raises(ValueError, match=f"{name} must be a non-negative integer"):
            im.imaml(self.model, self.x, self.y, **{name: -1})

    @pytest.mark.parametrize("cg_steps", [0, -1, 2.5])
    def test_cg_steps_must_be_positive(self, cg_steps):
        with pytest.raises(ValueError, match="cg_steps must be a positive integer"):
            im.imaml(self.model, self.x, self.y, cg_steps=cg_steps)

    def test_loss_fn_must_return_a_scalar_per_task(self):
        # T = n = 5 so that a per-example loss would broadcast silently.
        x, y = torch.randn(5, 5, 3), torch.randint(0, 2, (5, 5))
        per_example = lambda out, target: F.cross_entropy(out, target, reduction="none")  # noqa: E731
        with pytest.raises(ValueError, match=r"one scalar per task, got shape \(5,\)"):
            im.imaml(self.model, x, y, per_example)

    def test_input_dtype_must_match_the_model(self):
        with pytest.raises(TypeError, match="support_x is torch.float64 but the model's parameters are torch.float32"):
            im.imaml(self.model, self.x.double(), self.y)

    def test_half_precision_model_is_rejected(self):
        with pytest.raises(TypeError, match="float32 or float64"):
            im.imaml(self.model.bfloat16(), self.x.bfloat16(), self.y)

    def test_operator_must_be_a_pair(self):
        with pytest.raises(ValueError, match="operator must be a pair"):
            im.imaml(self.model, self.x, self.y, operator=(1.0, 0.5, 2.0))

    def test_options_the_hf_solver_would_ignore(self):
        with pytest.raises(ValueError, match="use inner_solver='gd'"):
            im.imaml(self.model, self.x, self.y, inner_solver="hf", compat="imaml_dev")
        with pytest.raises(ValueError, match="max_grad_norm"):
            im.imaml(self.model, self.x, self.y, inner_solver="hf", max_grad_norm=1.0)

    def test_nan_query_gradient_gives_nan_meta_gradient(self):
        """A task whose query loss is NaN must not silently contribute 0."""
        adapted = im.imaml(self.model, self.x, self.y, inner_steps=2)
        xq = self.x.clone()
        xq[1] = float("nan")
        F.cross_entropy(adapted(xq).flatten(0, 1), self.y.flatten()).backward()
        assert all(torch.isnan(p.grad).any() for p in self.model.parameters())
        assert "non-finite" in adapted.info["cg"].summary()

    def test_forward_hvp_with_mse_loss_names_the_workaround(self):
        x, y = torch.randn(2, 4, 3), torch.randn(2, 4, 2)
        # Whether this PyTorch has a forward-mode derivative of mse_loss's backward:
        # exactly one outcome is then right.
        try:
            torch.func.jvp(torch.func.grad(lambda o: F.mse_loss(o, y[0])), (x[0, :, :2],),
                           (torch.ones(4, 2),))
            supported = True
        except RuntimeError as e:
            assert "ZeroTensors are immutable" in str(e)
            supported = False
        adapted = im.imaml(self.model, x, y, F.mse_loss, inner_steps=1, hvp_mode="forward")
        if not supported:
            with pytest.raises(RuntimeError, match="hvp_mode='reverse'"):
                F.mse_loss(adapted(x), y).backward()
            return
        F.mse_loss(adapted(x), y).backward()
        forward = [p.grad.clone() for p in self.model.parameters()]
        self.model.zero_grad()
        adapted = im.imaml(self.model, x, y, F.mse_loss, inner_steps=1, hvp_mode="reverse")
        F.mse_loss(adapted(x), y).backward()
        for f, p in zip(forward, self.model.parameters()):
            torch.testing.assert_close(f, p.grad)

    def test_nan_in_data(self):
        x = self.x.clone()
        x[1, 2, 0] = float("nan")
        with pytest.raises(ValueError, match="support_x contains NaN"):
            im.imaml(self.model, x, self.y)

    def test_batchnorm_running_stats(self):
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        with pytest.raises(ValueError, match="track_running_stats=False"):
            im.imaml(model, self.x, self.y)

    def test_batchnorm_batch_stats_work(self):
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2))
        adapted = im.imaml(model, self.x, self.y, inner_steps=2)
        F.cross_entropy(adapted(self.x).flatten(0, 1), self.y.flatten()).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())

    def test_unknown_solver_and_compat(self):
        with pytest.raises(ValueError, match="inner_solver"):
            im.imaml(self.model, self.x, self.y, inner_solver="adam")
        with pytest.raises(ValueError, match="compat"):
            im.imaml(self.model, self.x, self.y, compat="paper")

    def test_divergent_inner_loop_names_task_and_step(self):
        model = nn.Linear(3, 1)
        x = torch.randn(2, 5, 3)
        x[1] *= 1e3
        y = torch.randn(2, 5)
        with pytest.raises(NonFiniteLossError, match="task 1 at step"):
            im.imaml(model, x, y, half_mse, inner_lr=10.0, inner_steps=200)

    def test_wrong_shape_query(self):
        adapted = im.imaml(self.model, self.x, self.y, inner_steps=1)
        with pytest.raises(ValueError, match=r"\[T=2, m, ...\]"):
            adapted(torch.randn(3, 4, 3))


# --- the linear solver of the backward pass ---------------------------------------------

def ridge_meta_gradient(linear_solver, lam=LAM, **kw):
    """(meta-gradient, closed form, info) on the ridge tasks, φ* exact (two Newton steps)."""
    xs, ys, xq, yq = ridge_tasks()
    torch.manual_seed(0)
    model = nn.Linear(5, 1, bias=False).double()
    theta = model.weight.detach().flatten().clone()
    adapted = im.imaml(model, xs, ys, half_mse, lam=lam, inner_solver="hf", inner_steps=2,
                       inner_cg_steps=12, linear_solver=linear_solver, **kw)
    sum(half_mse(adapted(xq)[t], yq[t]) for t in range(xq.shape[0])).backward()
    _, meta_ref = ridge_closed_form(theta, xs, ys, xq, yq, lam)
    return model.weight.grad.flatten(), meta_ref, adapted.info


def test_default_linear_solver_is_cg():
    got, ref, info = ridge_meta_gradient("cg", cg_steps=30, cg_tol=1e-14)
    assert (got - ref).norm() / ref.norm() < 1e-8
    assert info["linear_solve"] is info["cg"] and isinstance(info["cg"], im.CGResult)
    same, _, _ = ridge_meta_gradient(im.CG(max_iter=30, tol=1e-14))
    assert torch.equal(same, got)


def test_neumann_linear_solver_matches_closed_form():
    """A = I + H/λ with ‖H‖ ≤ 3.6 here, so A's spectrum lies in [1, 2.8]: α = 0.5
    gives ‖I − αA‖ = 0.5, the error falls with the number of terms and 80 terms
    reach rounding."""
    errors = []
    for steps in (2, 10, 80):
        got, ref, info = ridge_meta_gradient(im.Neumann(steps=steps, alpha=0.5))
        errors.append(((got - ref).norm() / ref.norm()).item())
        assert isinstance(info["linear_solve"], torch.Tensor) and "cg" not in info
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-10


def test_user_linear_solver_sees_the_operator():
    """A callable that builds each A_t densely from the matvec it is given and
    solves with torch.linalg.solve agrees with the closed form."""
    def dense_solve(matvec, rhs):
        T, P = rhs.shape
        eye = torch.eye(P, dtype=rhs.dtype)
        columns = [matvec(eye[i].expand(T, P).contiguous()) for i in range(P)]
        A = torch.stack(columns, dim=2)               # A[t][:, i] = A_t e_i
        return torch.linalg.solve(A, rhs)

    got, ref, info = ridge_meta_gradient(dense_solve)
    assert (got - ref).norm() / ref.norm() < 1e-10
    # The general operator A = a·I + b·H reaches the callable as well.
    got, _, _ = ridge_meta_gradient(dense_solve, operator=(1.5, 0.25))
    xs, ys, xq, yq = ridge_tasks()
    torch.manual_seed(0)
    theta = nn.Linear(5, 1, bias=False).double().weight.detach().flatten()
    phi, _ = ridge_closed_form(theta, xs, ys, xq, yq, LAM)
    resid = (xq @ phi.unsqueeze(-1)).squeeze(-1) - yq
    grad_q = (xq.transpose(1, 2) @ resid.unsqueeze(-1)).squeeze(-1) / xq.shape[1]
    H = xs.transpose(1, 2) @ xs / xs.shape[1]
    ref = torch.linalg.solve(1.5 * torch.eye(5, dtype=torch.float64) + 0.25 * H, grad_q).sum(0)
    assert (got - ref).norm() / ref.norm() < 1e-10


class TestBadLinearSolver:
    def setup_method(self):
        self.model = nn.Linear(3, 2)
        self.x, self.y = torch.randn(2, 5, 3), torch.randint(0, 2, (2, 5))

    def backward(self, **kw):
        adapted = im.imaml(self.model, self.x, self.y, inner_steps=1, **kw)
        F.cross_entropy(adapted(self.x).flatten(0, 1), self.y.flatten()).backward()

    def test_unknown_name(self):
        with pytest.raises(ValueError, match="linear_solver must be 'cg'.*'gmres'"):
            im.imaml(self.model, self.x, self.y, linear_solver="gmres")

    def test_not_callable(self):
        with pytest.raises(TypeError, match="linear_solver must be 'cg' or a callable"):
            im.imaml(self.model, self.x, self.y, linear_solver=3)

    def test_class_instead_of_object(self):
        with pytest.raises(TypeError, match=r"not its class: pass Neumann\(...\)"):
            im.imaml(self.model, self.x, self.y, linear_solver=im.Neumann)

    @pytest.mark.parametrize("kw", [dict(cg_steps=10), dict(cg_tol=1e-6)])
    def test_cg_settings_with_another_solver(self, kw):
        with pytest.raises(ValueError, match="cg_steps and cg_tol configure linear_solver='cg'"):
            im.imaml(self.model, self.x, self.y, linear_solver=im.Neumann(), **kw)

    def test_wrong_shape(self):
        with pytest.raises(ValueError, match=r"linear_solver returned shape \(8,\), expected \[T, P\] = \(2, 8\)"):
            self.backward(linear_solver=lambda matvec, rhs: rhs.sum(0))

    def test_no_solution(self):
        with pytest.raises(TypeError, match="solution"):
            self.backward(linear_solver=lambda matvec, rhs: "done")


# --- "off" is None, deprecated spellings --------------------------------------------------

def test_zero_for_off_is_deprecated_and_means_off():
    xs, ys, xq, yq = ridge_tasks(T=2)
    grads = {}
    for name, kw in (("none", {}), ("zeros", dict(cg_tol=0.0, max_grad_norm=0))):
        torch.manual_seed(0)
        model = nn.Linear(5, 1, bias=False).double()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            adapted = im.imaml(model, xs, ys, half_mse, inner_steps=5, **kw)
        deprecations = [str(w.message) for w in caught if w.category is DeprecationWarning]
        assert len(deprecations) == len(kw) and all("=None" in m for m in deprecations)
        half_mse(adapted(xq)[0], yq[0]).backward()
        grads[name] = model.weight.grad
    assert torch.equal(grads["none"], grads["zeros"])


def test_cg_damping_only_with_imaml_dev():
    model = nn.Linear(3, 2)
    x, y = torch.randn(2, 5, 3), torch.randint(0, 2, (2, 5))
    with pytest.raises(ValueError, match="cg_damping.*only with compat='imaml_dev'"):
        im.imaml(model, x, y, cg_damping=1.0)
    im.imaml(model, x, y, compat="imaml_dev", inner_steps=1)  # default damping 1.0


def test_imaml_dev_default_damping_is_one():
    xs, ys, xq, yq = ridge_tasks(T=2)
    grads = []
    for kw in ({}, dict(cg_damping=1.0)):
        torch.manual_seed(0)
        model = nn.Linear(5, 1, bias=False).double()
        adapted = im.imaml(model, xs, ys, half_mse, inner_steps=3, compat="imaml_dev", **kw)
        half_mse(adapted(xq)[1], yq[1]).backward()
        grads.append(model.weight.grad)
    assert torch.equal(*grads)


# --- Adapted.params -------------------------------------------------------------------------

def test_adapted_params_are_named_views_that_carry_the_meta_gradient():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    T = 3
    xs, ys, xq, yq = classification_tasks(T, 6, 5, 3, 2)
    adapted = im.imaml(model, xs, ys, F.cross_entropy, inner_steps=5)
    params = adapted.params
    assert list(params) == [n for n, _ in model.named_parameters()]
    offset = 0
    for name, p in model.named_parameters():
        assert params[name].shape == (T, *p.shape)
        assert torch.equal(params[name].reshape(T, -1), adapted.flat[:, offset:offset + p.numel()])
        offset += p.numel()
    # The query loss through functional_call on params gives the same meta-gradient as adapted(x).
    loss = sum(F.cross_entropy(functional_call(model, {n: v[t] for n, v in params.items()}, (xq[t],)), yq[t])
               for t in range(T))
    loss.backward()
    via_params = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    adapted = im.imaml(model, xs, ys, F.cross_entropy, inner_steps=5)
    sum(F.cross_entropy(adapted(xq)[t], yq[t]) for t in range(T)).backward()
    for a, p in zip(via_params, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-12, atol=1e-14)


# --- torch.func transforms over im.imaml -----------------------------------------------------

class MetaLoss(nn.Module):
    """The query loss after iMAML adaptation, as a module, so that torch.func.functional_call
    can supply the network's parameters."""

    def __init__(self, net, **kw):
        super().__init__()
        self.net, self.kw = net, kw

    def forward(self, xs, ys, xq, yq):
        adapted = im.imaml(self.net, xs, ys, F.cross_entropy, **self.kw)
        return F.cross_entropy(adapted(xq).flatten(0, 1), yq.flatten())


@pytest.mark.parametrize("hvp_mode", ["auto", "forward"])
def test_torch_func_grad_and_vjp_equal_backward(hvp_mode):
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    T = 3
    batch = classification_tasks(T, 6, 5, 3, 2)
    meta = MetaLoss(net, lam=1.5, inner_steps=10, inner_lr=0.3, cg_steps=7, hvp_mode=hvp_mode)
    params = {n: p.detach().clone() for n, p in meta.named_parameters()}

    def f(p):
        return functional_call(meta, p, batch)

    by_grad = torch.func.grad(f)(params)
    value, pullback = torch.func.vjp(f, params)
    (by_vjp,) = pullback(torch.ones_like(value))
    meta(*batch).backward()
    for n, p in meta.named_parameters():
        torch.testing.assert_close(by_grad[n], p.grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(by_vjp[n], p.grad, rtol=1e-12, atol=1e-14)


def test_torch_func_grad_through_task_chunks_equals_backward():
    """With task_chunk, torch.func.grad runs the chunks without recomputation and gives
    the meta-gradient of .backward() (which recomputes them)."""
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    batch = classification_tasks(3, 6, 5, 3, 2)
    meta = MetaLoss(net, lam=1.5, inner_steps=10, inner_lr=0.3, cg_steps=7, task_chunk=2)
    params = {n: p.detach().clone() for n, p in meta.named_parameters()}
    by_grad = torch.func.grad(lambda p: functional_call(meta, p, batch))(params)
    meta(*batch).backward()
    for n, p in meta.named_parameters():
        assert p.grad.abs().max() > 0
        torch.testing.assert_close(by_grad[n], p.grad, rtol=1e-12, atol=1e-14)


def test_torch_func_grad_refuses_reverse_hvp():
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    batch = (torch.randn(2, 6, 3, dtype=torch.float64), torch.randint(0, 2, (2, 6)),
             torch.randn(2, 5, 3, dtype=torch.float64), torch.randint(0, 2, (2, 5)))
    meta = MetaLoss(net, inner_steps=2, hvp_mode="reverse")
    params = {n: p.detach() for n, p in meta.named_parameters()}
    with pytest.raises(ValueError, match="inside a torch.func transform"):
        torch.func.grad(lambda p: functional_call(meta, p, batch))(params)


# --- task_chunk ---------------------------------------------------------------------------

class _SolutionHolder:
    """A user's solver result that is neither a tensor nor a CGResult: the solution as .x."""

    def __init__(self, x):
        self.x = x


@pytest.mark.parametrize("linear_solver", ["cg", "neumann", "holder"])
def test_task_chunk_matches_closed_form(linear_solver):
    """T = 4 tasks in chunks of 3 and 1: the meta-gradient is the closed form's and the
    solver's per-task results cover all four tasks."""
    neumann = im.Neumann(steps=80, alpha=0.5)
    solver = {"cg": "cg", "neumann": neumann,
              "holder": lambda matvec, rhs: _SolutionHolder(neumann(matvec, rhs))}[linear_solver]
    kw = dict(cg_steps=30, cg_tol=1e-14) if linear_solver == "cg" else {}
    got, ref, info = ridge_meta_gradient(solver, task_chunk=3, **kw)
    assert (got - ref).norm() / ref.norm() < 1e-8
    if linear_solver == "cg":
        # the chunks' solutions are summed as they come, not kept
        assert info["cg"].x is None and info["cg"].state.shape == (4,) and info["cg"].iterations.shape == (4,)
        assert (info["cg"].state == im.solvers.CGState.CONVERGED).all()
    elif linear_solver == "neumann":
        assert info["linear_solve"].shape[0] == 4
    else:
        assert [len(r.x) for r in info["linear_solve"]] == [3, 1] and info["linear_solve"].x.shape[0] == 4


@pytest.mark.parametrize("task_chunk", [1, 2, 5])
def test_task_chunk_equals_unchunked_convnet(task_chunk):
    """Conv → batch norm (per-task batch statistics) → ReLU → linear, T = 5, float64: the
    chunked meta-gradient (inner solve, CG and the query forward, the latter recomputed in
    the backward pass) equals the all-at-once one to rounding, through adapted(x) and
    adapted.loss alike."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4, track_running_stats=False),
                          nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).double()
    xs, xq = torch.rand(5, 6, 1, 8, 8, dtype=torch.float64), torch.rand(5, 9, 1, 8, 8, dtype=torch.float64)
    ys, yq = torch.arange(3).repeat(5, 2), torch.arange(3).repeat(5, 3)
    kw = dict(lam=2.0, inner_steps=6, inner_lr=0.2, cg_steps=4)

    def meta_grad(chunk, through_loss):
        model.zero_grad()
        adapted = im.imaml(model, xs, ys, F.cross_entropy, task_chunk=chunk, **kw)
        if through_loss:
            adapted.loss(xq, yq).sum().backward()
        else:
            F.cross_entropy(adapted(xq).flatten(0, 1), yq.flatten()).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]), adapted

    for through_loss in (True, False):
        whole, _ = meta_grad(None, through_loss)
        chunked, adapted = meta_grad(task_chunk, through_loss)
        assert whole.abs().max() > 0
        assert (chunked - whole).norm() / whole.norm() < 1e-12
        assert adapted.info["cg"].state.shape == (5,)


def _dropout_adapted(task_chunk):
    """An Adapted of T = 4 tasks whose model draws dropout masks, float64, flat [4, P] a leaf."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 2)).double()
    task_loss = im.functional.TaskLoss(model, F.cross_entropy)
    flat = (task_loss.layout.flatten(dict(model.named_parameters())).detach()
            + 0.1 * torch.randn(4, task_loss.layout.numel, dtype=torch.float64)).requires_grad_(True)
    return Adapted(task_loss, flat, {}, task_chunk=task_chunk), task_loss


def test_task_chunk_recomputation_replays_dropout_and_keeps_the_random_stream():
    """Chunks of 3 and 1: the recomputed backward draws the forward's dropout masks (the
    gradient equals differentiating the same forward kept whole, chunk after chunk from
    the same seed), and it leaves the global random stream where the forward left it."""
    x, y = torch.randn(4, 5, 3, dtype=torch.float64), torch.randint(0, 2, (4, 5))
    adapted, task_loss = _dropout_adapted(task_chunk=3)
    torch.manual_seed(3)
    loss = adapted.loss(x, y)
    after_forward = torch.get_rng_state()
    (got,) = torch.autograd.grad(loss.sum(), adapted.flat)
    assert torch.equal(torch.get_rng_state(), after_forward)

    torch.manual_seed(3)
    kept = torch.cat([task_loss.losses(adapted.flat[c], x[c], y[c]) for c in (slice(0, 3), slice(3, 4))])
    (want,) = torch.autograd.grad(kept.sum(), adapted.flat)
    assert torch.equal(loss, kept.detach())
    assert want.abs().max() > 0
    assert (got - want).abs().max() <= 1e-13 * want.abs().max()


def test_task_chunk_recomputation_is_twice_differentiable():
    """A Hessian-vector product through the chunked loss (create_graph through the
    recomputation) equals the unchunked one, and so does the input gradient."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    task_loss = im.functional.TaskLoss(model, F.cross_entropy)
    base = task_loss.layout.flatten(dict(model.named_parameters())).detach()
    x = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 2, (5, 4))
    v = torch.randn(5, task_loss.layout.numel, dtype=torch.float64)

    def hvp_and_input_grad(task_chunk):
        flat = (base + 0.2 * torch.arange(5.0, dtype=torch.float64)[:, None]).requires_grad_(True)
        loss = Adapted(task_loss, flat, {}, task_chunk=task_chunk).loss(x, y).sum()
        g, gx = torch.autograd.grad(loss, (flat, x), create_graph=True)
        (hv,) = torch.autograd.grad((g * v).sum(), flat)
        return hv, gx.detach()

    (hv, gx), (hv_chunked, gx_chunked) = hvp_and_input_grad(None), hvp_and_input_grad(2)
    assert hv.abs().max() > 0 and gx.abs().max() > 0
    assert (hv_chunked - hv).norm() / hv.norm() < 1e-12
    assert (gx_chunked - gx).norm() / gx.norm() < 1e-12


def test_task_chunk_does_not_import_dynamo(tmp_path):
    """A chunked iMAML meta-gradient in a fresh interpreter leaves torch._dynamo
    unimported (torch.utils.checkpoint imports it on its first call: 1.3 s, ~150 MB)."""
    probe = (
        "import sys, torch, torch.nn.functional as F\n"
        "import imaml_ext as im\n"
        "model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))\n"
        "x, y = torch.randn(4, 5, 3), torch.randint(0, 2, (4, 5))\n"
        "im.imaml(model, x, y, F.cross_entropy, lam=1.0, inner_steps=2, inner_lr=0.1, task_chunk=2)"
        ".loss(x, y).sum().backward()\n"
        "assert model[0].weight.grad.abs().max() > 0\n"
        "print('dynamo imported:', 'torch._dynamo' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "dynamo imported: False" in proc.stdout, proc.stdout


def test_task_chunk_solves_each_chunk_right_after_its_query_backward(monkeypatch):
    """Autograd runs chunk k's backward solve right after chunk k's recomputed query
    backward, before the next chunk's, so no chunk's query gradient waits for the
    others (the memory of task_chunk); the chunks go last to first."""
    from imaml_ext import adapted as adapted_module, implicit
    events = []
    recompute, solve = adapted_module._Recomputed.backward, implicit._StreamedChunks.solve

    def recorded_recompute(ctx, grad):
        events.append(("query", grad.shape[0]))
        return recompute(ctx, grad)

    def recorded_solve(self, i, rhs):
        events.append(("solve", i))
        return solve(self, i, rhs)

    monkeypatch.setattr(adapted_module._Recomputed, "backward", staticmethod(recorded_recompute))
    monkeypatch.setattr(implicit._StreamedChunks, "solve", recorded_solve)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 6, 3, dtype=torch.float64), torch.randint(0, 2, (5, 6))
    adapted = im.imaml(model, x, y, F.cross_entropy, lam=1.0, inner_steps=3, inner_lr=0.1, task_chunk=2)
    adapted.loss(x, y).sum().backward()
    assert events == [("query", 1), ("solve", 2), ("query", 2), ("solve", 1), ("query", 2), ("solve", 0)]
    assert adapted.info["cg"].state.shape == (5,) and adapted.info["nonpositive_curvature"].shape == (5,)


def test_task_chunk_loss_and_flat_used_together():
    """A loss through adapted.loss (chunk-by-chunk solves) plus a term on adapted.flat
    (the whole-batch solve): two systems where the unchunked path solves their sum, so
    with CG run to convergence (linear in its right-hand side) the meta-gradient is the
    unchunked one, to rounding."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    xs, ys = torch.randn(5, 6, 3, dtype=torch.float64), torch.randint(0, 2, (5, 6))
    xq, yq = torch.randn(5, 7, 3, dtype=torch.float64), torch.randint(0, 2, (5, 7))

    def meta_grad(chunk):
        model.zero_grad()
        adapted = im.imaml(model, xs, ys, F.cross_entropy, lam=1.0, inner_steps=8, inner_lr=0.2, cg_steps=60,
                           cg_tol=1e-15, task_chunk=chunk)
        (adapted.loss(xq, yq).sum() + 0.3 * (adapted.flat ** 2).sum()).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    whole, chunked = meta_grad(None), meta_grad(2)
    assert whole.abs().max() > 0
    assert (chunked - whole).norm() / whole.norm() < 1e-12


def _small_chunked(task_chunk, **kw):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(5, 6, 3), torch.randint(0, 2, (5, 6))
    return model, x, y, im.imaml(model, x, y, F.cross_entropy, lam=1.0, inner_steps=3, inner_lr=0.1,
                                 task_chunk=task_chunk, **kw)


def test_task_chunk_recomputation_replays_autocast():
    """A query loss under CPU autocast (bfloat16): the chunks' recomputation runs under
    the same autocast, so the meta-gradient is the unchunked one."""
    grads = []
    for chunk in (None, 2):
        model, x, y, adapted = _small_chunked(chunk)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = adapted.loss(x, y).sum()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 0
    assert (grads[1] - grads[0]).norm() / grads[0].norm() < 1e-6


def test_task_chunk_adapted_made_without_grad_stays_without_grad():
    with torch.no_grad():
        _, x, y, adapted = _small_chunked(2)
    assert not adapted.loss(x, y).requires_grad and not adapted(x).requires_grad


def test_task_chunk_second_backward_records_once(monkeypatch):
    """retain_graph and a second backward: the chunks' results are recorded once per
    backward, and the meta-gradient doubles."""
    from imaml_ext import implicit
    records = []
    record = implicit._ImplicitSystem.record
    monkeypatch.setattr(implicit._ImplicitSystem, "record", lambda self, r: (records.append(r), record(self, r)))
    model, x, y, adapted = _small_chunked(2)
    loss = adapted.loss(x, y).sum()
    loss.backward(retain_graph=True)
    once = torch.cat([p.grad.flatten() for p in model.parameters()]).clone()
    loss.backward()
    twice = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert len(records) == 2 and all(r.state.shape == (5,) for r in records)
    torch.testing.assert_close(twice, 2 * once)


def test_task_chunk_under_torch_func_with_no_wrapped_input():
    """A torch.func transform active around adapted.loss, with neither φ* nor the data
    wrapped: the chunks run without the recomputing Function, which functorch refuses."""
    _, x, y, adapted = _small_chunked(2)
    value = adapted.loss(x, y).sum().detach()
    got = torch.func.grad(lambda s: s * adapted.loss(x, y).sum())(torch.tensor(1.0))
    torch.testing.assert_close(got, value)


def test_task_chunk_checks_its_value_and_names_the_chunk_of_a_bad_task():
    model = nn.Linear(3, 1)
    x, y = torch.randn(4, 5, 3), torch.randn(4, 5)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="task_chunk must be a positive integer"):
            im.imaml(model, x, y, half_mse, task_chunk=bad)
    x[3] *= 1e3  # task 3 diverges: task 1 of the chunk of tasks 2..3
    with pytest.raises(NonFiniteLossError, match=r"chunk of tasks 2\.\.3 .*count from 2\).*task 1 at step"):
        im.imaml(model, x, y, half_mse, task_chunk=2)
