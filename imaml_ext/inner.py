"""Inner-problem solvers of iMAML, batched over tasks, run without an autograd graph.

Each solver approximates, for every task t,

    φ_t* = argmin_φ  F_t(φ) = L̂_t(φ) + (λ/2)‖φ − θ‖²,

starting from φ = θ, and returns φ* as a ``[T, P]`` buffer.

* :func:`solve_gd`: gradient descent on F (iMAML-GD).
* :func:`solve_nesterov`: Nesterov's accelerated gradient descent on F.
* :func:`solve_hf`: Hessian-free Newton (iMAML-HF): direction from CG on
  (H + λI) d = −∇F, then a backtracking line search on F, per task.

Diagnostics: given a ``diagnostics`` dict, ``solve_gd``, ``solve_nesterov``
and ``solve_hf`` fill it with the per-task stationarity residual
‖∇F_t‖ = ‖∇L̂_t + λ(φ − θ)‖ from gradients they evaluate anyway (no extra
pass): ``residual_at_theta`` ``[T]`` at the start φ = θ, ``residual_norm``
``[T]`` at the *last iterate whose gradient was evaluated* — for GD and HF
the iterate before the last step (φ_{K−1}), for Nesterov the last
extrapolated point y_{K−1} — and ``steps_taken`` ``[T]`` int64.  A GD step
with lr < 2/L changes the residual by a factor of at most max|1 − lr·μ_i|
over F's curvatures μ_i, so the returned point's residual is of the same
size or smaller.  For a task stopped by ``tol`` the residual is that of
the returned point itself.

Tolerance: with ``tol``, a task stops moving once its relative residual
‖∇F_t(φ)‖/‖∇F_t(θ)‖ ≤ tol; the decision is a per-task mask on the device
(no host synchronisation), and the loop keeps its fixed length (the
batched forward–backward of the remaining tasks runs for all of them).
* :func:`solve_imaml_dev`: the loop of the official iMAML code — gradient
  descent on the *unregularised* L̂, then one pull-back step
  φ ← φ − α·λ(φ − θ).  Only for reproducing that code.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import ops
from .finite import FiniteWatch, NonFiniteLossError
from .functional import TaskLoss
from .hvp import make_curvature
from .solvers import cg

__all__ = ["solve_gd", "solve_nesterov", "nesterov_momentum", "solve_hf", "solve_imaml_dev",
           "NonFiniteLossError"]


def _start(theta: torch.Tensor, num_tasks: int) -> torch.Tensor:
    return theta.detach().unsqueeze(0).repeat(num_tasks, 1).contiguous()


class _Residual:
    """Per-task stationarity residual ‖∇L̂(z) + λ(z − θ)‖ of the iterates z whose
    gradient a solver evaluates, and, with ``tol``, the mask of tasks still moving."""

    def __init__(self, theta: torch.Tensor, num_tasks: int, lam: float, steps: int, tol: Optional[float]):
        self.theta, self.lam, self.steps, self.tol = theta, lam, steps, tol
        self.at_theta: Optional[torch.Tensor] = None
        self.norm: Optional[torch.Tensor] = None
        self.active = torch.ones(num_tasks, dtype=torch.bool, device=theta.device)
        self.taken = torch.zeros(num_tasks, dtype=torch.int64, device=theta.device)

    def update(self, k: int, g: torch.Tensor, z: torch.Tensor) -> Optional[torch.Tensor]:
        """Step k's gradient ``g`` of L̂ at ``z`` (both ``[T, P]``); returns the
        ``[T]`` mask of tasks that take this step, None when all do (no tol)."""
        if k == 0 or k == self.steps - 1 or self.tol is not None:
            self.norm = ops.batched_sq_norm(torch.add(g, z - self.theta, alpha=self.lam)).sqrt()
            if k == 0:
                self.at_theta = self.norm
        if self.tol is None:
            return None
        self.active = self.active & (self.norm > self.tol * self.at_theta)
        self.taken += self.active
        return self.active

    def report(self, diagnostics: Optional[dict]) -> None:
        if diagnostics is None or self.norm is None:
            return
        diagnostics["residual_norm"] = self.norm
        diagnostics["residual_at_theta"] = self.at_theta
        diagnostics["steps_taken"] = self.taken if self.tol is not None else torch.full_like(self.taken, self.steps)


def solve_gd(task_loss: TaskLoss, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
             lam: float, steps: int, lr: float, max_grad_norm: Optional[float] = None,
             tol: Optional[float] = None, diagnostics: Optional[dict] = None) -> torch.Tensor:
    """Gradient descent on F: φ ← φ − α(∇L̂(φ) + λ(φ − θ)), ``steps`` times.

    ``max_grad_norm`` (> 0) clips each task's ∇L̂ to that global norm first;
    None (or 0) does not clip.  ``tol`` and ``diagnostics``: module docstring
    (the residual uses the unclipped gradient).
    theta ``[P]``, x/y ``[T, n, ...]`` -> ``[T, P]``.
    """
    theta = theta.detach().contiguous()
    phi = _start(theta, x.shape[0])
    watch = FiniteWatch(x.shape[0], phi.device)
    residual = _Residual(theta, x.shape[0], lam, steps, tol)
    clip = 0.0 if max_grad_norm is None else float(max_grad_norm)  # the fused op's 0 is "off"
    for k in range(steps):
        g, losses = task_loss.grad(phi, x, y)
        watch.update(k, losses)
        moving = residual.update(k, g, phi)
        before = None if moving is None else phi.clone()
        ops.prox_sgd_step_(phi, g.contiguous(), theta, lr, lam, clip)
        if moving is not None:
            phi = torch.where(moving[:, None], phi, before)
    watch.raise_if_bad("inner gradient descent")
    residual.report(diagnostics)
    return phi


def nesterov_momentum(lam: float, lr: float) -> float:
    """The default momentum of :func:`solve_nesterov`: β = (1 − √(λ·lr)) / (1 + √(λ·lr)),
    0 when λ·lr ≥ 1.

    Nesterov's constant for a μ-strongly convex objective with L-Lipschitz
    gradient is (1 − √(μ/L))/(1 + √(μ/L)).  F = L̂ + (λ/2)‖φ − θ‖² is
    λ-strongly convex where L̂ is convex (μ = λ), and a stable GD step lr
    means L ≈ 1/lr.
    """
    root = math.sqrt(lam * lr)
    return max(0.0, (1.0 - root) / (1.0 + root))


def solve_nesterov(task_loss: TaskLoss, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
                   lam: float, steps: int, lr: float, momentum: Optional[float] = None,
                   max_grad_norm: Optional[float] = None, tol: Optional[float] = None,
                   diagnostics: Optional[dict] = None) -> torch.Tensor:
    """Nesterov's accelerated gradient descent on F, ``steps`` gradient evaluations:

        φ_{k+1} = y_k − α ∇F(y_k),   y_{k+1} = φ_{k+1} + β (φ_{k+1} − φ_k),   y_0 = φ_0 = θ,

    with β = ``momentum`` (None: :func:`nesterov_momentum` (λ, α)).  On a
    μ-strongly convex F it needs O(√(L/μ)·log(1/ε)) gradients to reach a
    residual ε where GD needs O((L/μ)·log(1/ε)): the same cost per step as
    :func:`solve_gd`, fewer steps.  ``max_grad_norm``, ``tol``, ``diagnostics``:
    as :func:`solve_gd` (a task stopped by ``tol`` stays at the y_k whose
    residual met it).  theta ``[P]``, x/y ``[T, n, ...]`` -> ``[T, P]``.
    """
    beta = nesterov_momentum(lam, lr) if momentum is None else float(momentum)
    theta = theta.detach().contiguous()
    phi = _start(theta, x.shape[0])
    point = phi.clone()
    watch = FiniteWatch(x.shape[0], phi.device)
    residual = _Residual(theta, x.shape[0], lam, steps, tol)
    clip = 0.0 if max_grad_norm is None else float(max_grad_norm)
    for k in range(steps):
        g, losses = task_loss.grad(point, x, y)
        watch.update(k, losses)
        moving = residual.update(k, g, point)
        new = point.clone()
        ops.prox_sgd_step_(new, g.contiguous(), theta, lr, lam, clip)
        if moving is not None:
            new = torch.where(moving[:, None], new, point)
        point = torch.add(new, new - phi, alpha=beta)
        if moving is not None:
            point = torch.where(moving[:, None], point, new)
        phi = new
    watch.raise_if_bad("inner Nesterov gradient descent")
    residual.report(diagnostics)
    return phi


def solve_imaml_dev(task_loss: TaskLoss, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
                    lam: float, steps: int, lr: float, max_grad_norm: Optional[float] = None) -> torch.Tensor:
    """The official code's inner loop: ``steps`` GD steps on L̂ alone, then
    φ ← φ − α·λ(φ − θ) once."""
    theta = theta.detach().contiguous()
    phi = solve_gd(task_loss, theta, x, y, lam=0.0, steps=steps, lr=lr, max_grad_norm=max_grad_norm)
    phi.sub_(phi - theta, alpha=lr * lam)
    return phi


def _objective(task_loss: TaskLoss, phi, theta, x, y, lam: float) -> torch.Tensor:
    """F_t(φ_t) for every task, ``[T]``."""
    return task_loss.losses(phi, x, y) + 0.5 * lam * ops.batched_sq_norm((phi - theta).contiguous())


def solve_hf(task_loss: TaskLoss, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
             lam: float, steps: int, cg_steps: int = 5, hvp_mode: str = "auto",
             max_backtracks: int = 10, armijo: float = 1e-4, curvature: str = "hessian",
             tol: Optional[float] = None, diagnostics: Optional[dict] = None) -> torch.Tensor:
    """Hessian-free Newton on F, ``steps`` Newton iterations.

    Direction: ``cg_steps`` of CG on (H + λI) d = −∇F (H of L̂ at the current
    φ, or its Gauss–Newton matrix with ``curvature="gauss_newton"``, which
    makes the system positive definite); where it is not a descent direction
    (CG stopped on negative curvature before moving), the steepest-descent
    direction −∇F is used.  ``tol`` and ``diagnostics``: module docstring.
    Step: the largest s in {1, 1/2, ..., 2^-(max_backtracks-1)} with
    F(φ + s d) ≤ F(φ) + armijo·s·⟨∇F, d⟩, chosen per task; a task with no
    such s does not move.
    """
    theta = theta.detach().contiguous()
    phi = _start(theta, x.shape[0])
    watch = FiniteWatch(x.shape[0], phi.device)
    residual = _Residual(theta, x.shape[0], lam, steps, tol)
    for k in range(steps):
        g, losses = task_loss.grad(phi, x, y)
        watch.update(k, losses)
        moving = residual.update(k, g, phi)
        diff = (phi - theta).contiguous()
        grad_f = (g + lam * diff).contiguous()
        f0 = losses + 0.5 * lam * ops.batched_sq_norm(diff)
        direction = cg(make_curvature(task_loss, phi, x, y, curvature, hvp_mode), -grad_f,
                       shift=lam, scale=1.0, max_iter=cg_steps).x
        slope = ops.batched_dot(grad_f, direction)
        descent = slope < 0
        direction = torch.where(descent[:, None], direction, -grad_f)
        slope = torch.where(descent, slope, -ops.batched_sq_norm(grad_f))
        step = torch.zeros_like(f0)
        accepted = torch.zeros_like(descent)
        s = 1.0
        for _ in range(max_backtracks):
            f_new = _objective(task_loss, phi + s * direction, theta, x, y, lam)
            ok = (f_new <= f0 + armijo * s * slope) & ~accepted
            step = torch.where(ok, s, step)
            accepted |= ok
            if bool(accepted.all()):
                break
            s *= 0.5
        if moving is not None:
            step = torch.where(moving, step, 0.0)
        phi = (phi + step[:, None] * direction).contiguous()
    watch.raise_if_bad("inner Hessian-free Newton")
    residual.report(diagnostics)
    return phi
