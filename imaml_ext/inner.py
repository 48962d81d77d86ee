"""Inner-problem solvers of iMAML, batched over tasks, run without an autograd graph.

Each solver approximates, for every task t,

    φ_t* = argmin_φ  F_t(φ) = L̂_t(φ) + (λ/2)‖φ − θ‖²,

starting from φ = θ, and returns φ* as a ``[T, P]`` buffer.

* :func:`solve_gd`: gradient descent on F (iMAML-GD).
* :func:`solve_hf`: Hessian-free Newton (iMAML-HF): direction from CG on
  (H + λI) d = −∇F, then a backtracking line search on F, per task.
* :func:`solve_imaml_dev`: the loop of the official iMAML code — gradient
  descent on the *unregularised* L̂, then one pull-back step
  φ ← φ − α·λ(φ − θ).  Only for reproducing that code.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import ops
from .finite import FiniteWatch, NonFiniteLossError
from .functional import TaskLoss
from .hvp import make_hvp
from .solvers import cg

__all__ = ["solve_gd", "solve_hf", "solve_imaml_dev", "NonFiniteLossError"]


def _start(theta: torch.Tensor, num_tasks: int) -> torch.Tensor:
    return theta.detach().unsqueeze(0).repeat(num_tasks, 1).contiguous()


def solve_gd(task_loss: TaskLoss, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *,
             lam: float, steps: int, lr: float, max_grad_norm: Optional[float] = None) -> torch.Tensor:
    """Gradient descent on F: φ ← φ − α(∇L̂(φ) + λ(φ − θ)), ``steps`` times.

    ``max_grad_norm`` (> 0) clips each task's ∇L̂ to that global norm first;
    None (or 0) does not clip.
    theta ``[P]``, x/y ``[T, n, ...]`` -> ``[T, P]``.
    """
    theta = theta.detach().contiguous()
    phi = _start(theta, x.shape[0])
    watch = FiniteWatch(x.shape[0], phi.device)
    clip = 0.0 if max_grad_norm is None else float(max_grad_norm)  # the fused op's 0 is "off"
    for k in range(steps):
        g, losses = task_loss.grad(phi, x, y)
        watch.update(k, losses)
        ops.prox_sgd_step_(phi, g.contiguous(), theta, lr, lam, clip)
    watch.raise_if_bad("inner gradient descent")
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
             max_backtracks: int = 10, armijo: float = 1e-4) -> torch.Tensor:
    """Hessian-free Newton on F, ``steps`` Newton iterations.

    Direction: ``cg_steps`` of CG on (H + λI) d = −∇F (H of L̂ at the current
    φ); where it is not a descent direction (CG stopped on negative
    curvature before moving), the steepest-descent direction −∇F is used.
    Step: the largest s in {1, 1/2, ..., 2^-(max_backtracks-1)} with
    F(φ + s d) ≤ F(φ) + armijo·s·⟨∇F, d⟩, chosen per task; a task with no
    such s does not move.
    """
    theta = theta.detach().contiguous()
    phi = _start(theta, x.shape[0])
    watch = FiniteWatch(x.shape[0], phi.device)
    for k in range(steps):
        g, losses = task_loss.grad(phi, x, y)
        watch.update(k, losses)
        diff = (phi - theta).contiguous()
        grad_f = (g + lam * diff).contiguous()
        f0 = losses + 0.5 * lam * ops.batched_sq_norm(diff)
        direction = cg(make_hvp(task_loss.per_task, phi, x, y, hvp_mode, task_loss.batching), -grad_f,
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
        phi = (phi + step[:, None] * direction).contiguous()
    watch.raise_if_bad("inner Hessian-free Newton")
    return phi
