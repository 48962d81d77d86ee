"""compat="imaml_dev" against the official iMAML code (aravindr93/imaml_dev).

The official Omniglot example's per-task loop body and its ``utils.cg_solve``
are re-stated here, per task and in float64 with plain ``torch.autograd``,
from the algorithm's description (not copied, and using nothing of
imaml_ext):

* inner loop: ``inner_steps`` GD steps on the unregularised support loss L̂_t,
  then one pull-back step w ← w − lr·λ(w − θ);
* g = ∇L_t(w), the query gradient at the adapted w;
* cg_steps ≤ 1: the task's outer gradient is g itself (no solve); otherwise
  cg_solve(A, g) with A v = (1 + d)·v + H v / (λ + 10), H = ∇²L̂_t(w), which
  stops a task after the iteration whose new rᵀr is below 1e-10 (absolute);
* the meta-gradient is the mean over tasks of the outer gradients.

``imaml(..., compat="imaml_dev")`` followed by ``.backward()`` of the mean
query loss must put that mean on the model's parameters to 1e-12 relative.
"""
import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.func import functional_call

import imaml_ext as im

LAM, LR, INNER_STEPS = 2.0, 0.1, 5
RESIDUAL_TOL = 1e-10  # utils.cg_solve's residual_tol


def half_mse(out, target):
    return 0.5 * ((out.squeeze(-1) - target) ** 2).mean()


def regression_problem():
    """Tiny tanh MLP on 1-d regression: model, loss_fn and T=3 tasks
    (support x ``[3, 10, 1]``, y ``[3, 10]``; query x ``[3, 8, 1]``, y ``[3, 8]``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    g = torch.Generator().manual_seed(4)
    amp = torch.rand(3, 1, 1, generator=g, dtype=torch.float64) + 0.5
    phase = torch.rand(3, 1, 1, generator=g, dtype=torch.float64)
    xs = 4 * torch.rand(3, 10, 1, generator=g, dtype=torch.float64) - 2
    xq = 4 * torch.rand(3, 8, 1, generator=g, dtype=torch.float64) - 2
    ys, yq = (amp * torch.sin(xs + phase)).squeeze(-1), (amp * torch.sin(xq + phase)).squeeze(-1)
    return model, half_mse, (xs, ys, xq, yq)


def classification_problem():
    """Tiny tanh classifier, 3 classes: model, F.cross_entropy and T=4 tasks
    (support x ``[4, 9, 8]``, y ``[4, 9]``; query x ``[4, 6, 8]``, y ``[4, 6]``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(4, 9, 8, generator=g, dtype=torch.float64)
    xq = torch.randn(4, 6, 8, generator=g, dtype=torch.float64)
    ys, yq = torch.randint(0, 3, (4, 9), generator=g), torch.randint(0, 3, (4, 6), generator=g)
    return model, F.cross_entropy, (xs, ys, xq, yq)


PROBLEMS = {"mlp_regression": regression_problem, "classifier": classification_problem}


def flat_params(model):
    """θ as one detached vector ``[P]``, in ``model.parameters()`` order."""
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def task_loss(model, loss_fn, w, x, y):
    """loss_fn of the model with flat parameters w ``[P]`` on one task's x ``[n, ...]``, y ``[n, ...]``."""
    named, offset = {}, 0
    for name, p in model.named_parameters():
        named[name] = w[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return loss_fn(functional_call(model, named, (x,)), y)


def loss_grad(model, loss_fn, w, x, y, create_graph=False):
    """∇_w of :func:`task_loss` at w ``[P]`` -> ``[P]``."""
    w = w if w.requires_grad else w.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(task_loss(model, loss_fn, w, x, y), w, create_graph=create_graph)
    return g


def cg_solve(matvec, b, iters, residual_tol=RESIDUAL_TOL):
    """The official cg_solve from x = 0: b ``[P]`` -> (x ``[P]``, iterations run,
    the rᵀr after each iteration).  No test before the first iteration, an
    absolute strict threshold on the new rᵀr, no curvature stop."""
    x = torch.zeros_like(b)
    r = b - matvec(x)
    p = r.clone()
    history = []
    for _ in range(iters):
        rdotr = r @ r
        ap = matvec(p)
        alpha = rdotr / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        new_rdotr = r @ r
        p = r + (new_rdotr / rdotr) * p
        history.append(float(new_rdotr))
        if new_rdotr < residual_tol:
            break
    return x, len(history), history


def official_outer_grad(model, loss_fn, theta, task, cg_steps, damping, residual_tol=RESIDUAL_TOL,
                        force_solve=False):
    """One task of the official loop: theta ``[P]``, task = (xs, ys, xq, yq) of one
    task -> (outer gradient ``[P]``, CG iterations run, rᵀr history).

    Another ``residual_tol``, and ``force_solve`` (CG even for cg_steps ≤ 1),
    are only for checking that the comparison can tell such variants apart."""
    xs, ys, xq, yq = task
    w = theta.clone()
    for _ in range(INNER_STEPS):
        w = w - LR * loss_grad(model, loss_fn, w, xs, ys)
    w = w - LR * LAM * (w - theta)
    g = loss_grad(model, loss_fn, w, xq, yq)
    if cg_steps <= 1 and not force_solve:
        return g, 0, []
    w = w.detach().requires_grad_(True)
    support_grad = loss_grad(model, loss_fn, w, xs, ys, create_graph=True)

    def matvec(v):
        (hv,) = torch.autograd.grad(support_grad, w, v, retain_graph=True)
        return (1.0 + damping) * v + hv / (LAM + 10.0)

    return cg_solve(matvec, g, cg_steps, residual_tol)


def official_meta_grad(model, loss_fn, data, cg_steps, damping, **kw):
    """Mean over tasks of :func:`official_outer_grad` -> (``[P]``, per-task
    iterations list, per-task rᵀr histories)."""
    theta = flat_params(model)
    results = [official_outer_grad(model, loss_fn, theta, tuple(d[t] for d in data), cg_steps, damping, **kw)
               for t in range(data[0].shape[0])]
    meta = torch.stack([r[0] for r in results]).mean(0)
    return meta, [r[1] for r in results], [r[2] for r in results]


def imaml_dev_meta_grad(model, loss_fn, data, cg_steps, **kw):
    """The meta-gradient ``[P]`` that imaml(compat="imaml_dev") leaves on the
    model after backward of the mean per-task query loss."""
    xs, ys, xq, yq = data
    model.zero_grad()
    adapted = im.imaml(model, xs, ys, loss_fn, lam=LAM, inner_steps=INNER_STEPS, inner_lr=LR,
                       cg_steps=cg_steps, compat="imaml_dev", **kw)
    adapted.loss(xq, yq).mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def rel_diff(a, b):
    """‖a − b‖ / ‖b‖ of two ``[P]`` vectors, b the reference."""
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("damping", [0.0, 1.0, None])
@pytest.mark.parametrize("cg_steps", [0, 1, 2, 5, 20])
def test_matches_official_loop(problem, cg_steps, damping):
    model, loss_fn, data = PROBLEMS[problem]()
    kw = {} if damping is None else {"cg_damping": damping}
    expected, _, histories = official_meta_grad(model, loss_fn, data, cg_steps,
                                                1.0 if damping is None else damping)
    # The early-stop decisions must not be rounding ties, or the comparison would be luck.
    assert not any(0.9 * RESIDUAL_TOL < rr < 1.1 * RESIDUAL_TOL for h in histories for rr in h)
    got = imaml_dev_meta_grad(model, loss_fn, data, cg_steps, **kw)
    assert rel_diff(got, expected) <= 1e-12


@pytest.mark.parametrize("problem", PROBLEMS)
def test_reference_exercises_the_official_rules(problem):
    """The settings above can tell the official rules from near misses: with
    cg_steps=20 tasks stop early on rᵀr < 1e-10, which changes the result, and
    applying that threshold to g/T (the gradient of a mean loss) would stop at
    other iterations; with cg_steps=1 "no solve" differs from one CG step."""
    model, loss_fn, data = PROBLEMS[problem]()
    T = data[0].shape[0]
    stopped, iterations, _ = official_meta_grad(model, loss_fn, data, 20, 0.0)
    assert min(iterations) < 20
    unstopped, _, _ = official_meta_grad(model, loss_fn, data, 20, 0.0, residual_tol=0.0)
    assert rel_diff(unstopped, stopped) > 1e-9
    # (g/T)ᵀ(g/T) < 1e-10  ⇔  gᵀg < T²·1e-10
    _, iterations_on_mean, _ = official_meta_grad(model, loss_fn, data, 20, 0.0,
                                                  residual_tol=T * T * RESIDUAL_TOL)
    assert iterations_on_mean != iterations

    no_solve, _, _ = official_meta_grad(model, loss_fn, data, 1, 1.0)
    one_step, _, _ = official_meta_grad(model, loss_fn, data, 1, 1.0, force_solve=True)
    assert rel_diff(one_step, no_solve) > 1e-3


def test_zero_cg_steps_rejected_without_compat():
    model, loss_fn, (xs, ys, _, _) = regression_problem()
    with pytest.raises(ValueError, match="cg_steps"):
        im.imaml(model, xs, ys, loss_fn, lam=LAM, inner_steps=INNER_STEPS, inner_lr=LR, cg_steps=0)


def test_solver_keeps_going_where_the_curvature_is_not_positive():
    """ImamlDevCG on explicit per-task matrices against :func:`cg_solve`: an
    indefinite system (where the default CG stops on pᵀAp ≤ 0) runs on as
    the official code does, and a task with a zero right-hand side gets x = 0."""
    g = torch.Generator().manual_seed(7)
    spd = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = torch.stack([spd @ spd.T + 6 * torch.eye(6, dtype=torch.float64),
                     torch.diag(torch.tensor([3.0, -2.0, 1.0, 0.5, -0.2, 2.0], dtype=torch.float64)),
                     torch.eye(6, dtype=torch.float64)])
    rhs = torch.randn(3, 6, generator=g, dtype=torch.float64)
    rhs[2] = 0
    result = im.solvers.ImamlDevCG(max_iter=4)(lambda v: torch.einsum("tij,tj->ti", A, v), rhs)
    for t in range(2):
        expected, iterations, _ = cg_solve(lambda v: A[t] @ v, rhs[t], 4)
        torch.testing.assert_close(result.x[t], expected, rtol=1e-12, atol=1e-12)
        assert int(result.iterations[t]) == iterations
    assert torch.equal(result.x[2], torch.zeros(6, dtype=torch.float64))
    default = im.cg(lambda v: torch.einsum("tij,tj->ti", A[:2], v), rhs[:2], max_iter=4)
    assert int(default.state[1]) == im.solvers.CGState.NONPOSITIVE_CURVATURE  # the rules differ here
