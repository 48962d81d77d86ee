"""Implicit MAML (Rajeswaran et al., 2019) as a ``torch.autograd.Function``.

Forward: solve every task's inner problem (:mod:`imaml_ext.inner`) with no
graph, returning φ* ``[T, P]``.  Backward: by the implicit function theorem
(the paper's Lemma 1), dφ_t*/dθ = (I + H_t/λ)⁻¹ with H_t = ∇²L̂_t(φ_t*),
which is symmetric, so the meta-gradient is

    ∂L/∂θ = Σ_t A_t⁻¹ ∂L/∂φ_t,   A_t = a·I + b·H_t   (a = 1, b = 1/λ),

with each A_t⁻¹ applied by batched conjugate gradient from x₀ = 0.  Memory
does not depend on the number of inner steps.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import inner
from .adapted import Adapted
from .functional import TaskLoss
from .hvp import HVP_MODES, make_hvp
from .solvers import CGState, cg
from .validation import check_nonnegative, check_positive, check_steps, check_task_batch

__all__ = ["imaml", "INNER_SOLVERS"]

INNER_SOLVERS = ("gd", "hf")
COMPAT_MODES = (None, "imaml_dev")


class _ImplicitMetaGrad(torch.autograd.Function):
    """theta [P] -> phi* [T, P]; backward applies Σ_t A_t⁻¹ to the incoming gradient."""

    @staticmethod
    def forward(ctx, theta: torch.Tensor, solve: Callable[[torch.Tensor], torch.Tensor],
                backward_cfg: Dict[str, object]) -> torch.Tensor:
        phi = solve(theta)
        ctx.cfg = backward_cfg
        ctx.save_for_backward(phi)
        return phi

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_phi: torch.Tensor):
        (phi,) = ctx.saved_tensors
        cfg = ctx.cfg
        task_loss: TaskLoss = cfg["task_loss"]
        matvec = make_hvp(task_loss.per_task, phi, cfg["x"], cfg["y"], cfg["hvp_mode"])
        result = cg(matvec, grad_phi.contiguous(), shift=cfg["a"], scale=cfg["b"],
                    max_iter=cfg["cg_steps"], tol=cfg["cg_tol"])
        cfg["info"]["cg"] = result
        # A task whose CG met a non-finite value (a NaN query gradient, say)
        # contributes NaN, as a differentiated loop would: never a silent 0.
        x = torch.where((result.state == CGState.NONFINITE)[:, None], torch.nan, result.x)
        return x.sum(0), None, None


def imaml(model: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor,
          loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy, *,
          lam: float = 2.0, inner_steps: int = 16, inner_lr: float = 0.1,
          inner_solver: str = "gd", cg_steps: int = 5, cg_tol: float = 0.0,
          inner_cg_steps: int = 5, max_grad_norm: float = 0.0, hvp_mode: str = "auto",
          operator: Optional[tuple] = None, compat: Optional[str] = None,
          cg_damping: float = 1.0) -> Adapted:
    """Adapt ``model`` to T tasks with iMAML; the result's backward yields the
    implicit meta-gradient on ``model``'s parameters.

    Args:
        model: any ``nn.Module``; its trainable parameters are θ (one dtype,
            one device).  Batch-norm must use batch statistics.
        support_x: ``[T, n, ...]`` support inputs, task dimension first.
        support_y: ``[T, n, ...]`` support targets.
        loss_fn: ``loss_fn(outputs [n, ...], targets [n, ...]) -> scalar``, one task.
        lam: λ > 0, strength of the proximal term (λ/2)‖φ − θ‖².
        inner_steps: GD steps (``"gd"``) or Newton steps (``"hf"``).
        inner_lr: GD step size (``"gd"`` and ``compat="imaml_dev"``).
        inner_solver: ``"gd"`` or ``"hf"`` (see :mod:`imaml_ext.inner`).
        cg_steps: CG iterations of the backward solve (≥ 1).
        cg_tol: relative residual at which a task's backward CG stops early.
        inner_cg_steps: CG iterations per Newton step of ``"hf"``.
        max_grad_norm: > 0 clips each task's inner gradient to this norm (``"gd"``).
        hvp_mode: ``"reverse"``, ``"forward"`` or ``"auto"`` (:mod:`imaml_ext.hvp`).
        operator: ``(a, b)`` to solve with A = a·I + b·H instead of I + H/λ.
        compat: ``"imaml_dev"`` reproduces the official iMAML code, which
            differs from the paper: plain GD on L̂ followed by one pull-back
            step φ ← φ − α·λ(φ − θ), and A = (1 + cg_damping)·I + H/(λ + 10).
            Never the default; use it only to compare with that code.
        cg_damping: d in the ``"imaml_dev"`` operator.

    Returns:
        :class:`~imaml_ext.adapted.Adapted`; after ``backward()``,
        ``adapted.info["cg"]`` holds the per-task CG outcome.
    """
    task_loss = TaskLoss(model, loss_fn)
    check_task_batch(task_loss, support_x, support_y)
    check_positive("lam", lam)
    check_positive("inner_lr", inner_lr)
    check_steps("inner_steps", inner_steps)
    if isinstance(cg_steps, bool) or not isinstance(cg_steps, int) or cg_steps < 1:
        raise ValueError(f"cg_steps must be a positive integer (0 CG steps would give a zero "
                         f"meta-gradient), got {cg_steps!r}")
    check_steps("inner_cg_steps", inner_cg_steps)
    check_nonnegative("cg_tol", cg_tol)
    check_nonnegative("max_grad_norm", max_grad_norm)
    if inner_solver not in INNER_SOLVERS:
        raise ValueError(f"inner_solver must be one of {INNER_SOLVERS}, got {inner_solver!r}")
    if hvp_mode not in HVP_MODES + ("auto",):
        raise ValueError(f"hvp_mode must be one of {HVP_MODES + ('auto',)}, got {hvp_mode!r}")
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
    if inner_solver == "hf" and compat == "imaml_dev":
        raise ValueError("compat='imaml_dev' runs the official code's GD inner loop; "
                         "use inner_solver='gd' with it")
    if inner_solver == "hf" and max_grad_norm > 0:
        raise ValueError("max_grad_norm clips the GD inner loop's gradients; "
                         "inner_solver='hf' does not use it")
    if task_loss.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"imaml needs float32 or float64 parameters, got {task_loss.dtype}; "
                        "call model.float() (or .double()) first")
    if operator is not None and (not isinstance(operator, (tuple, list)) or len(operator) != 2):
        raise ValueError(f"operator must be a pair (a, b) for A = a·I + b·H, got {operator!r}")

    x, y = support_x, support_y
    if compat == "imaml_dev":
        if operator is not None:
            raise ValueError("compat='imaml_dev' fixes the operator; do not pass operator as well")
        check_nonnegative("cg_damping", cg_damping)
        a, b = 1.0 + cg_damping, 1.0 / (lam + 10.0)

        def solve(theta):
            return inner.solve_imaml_dev(task_loss, theta, x, y, lam=lam, steps=inner_steps,
                                         lr=inner_lr, max_grad_norm=max_grad_norm)
    else:
        a, b = (1.0, 1.0 / lam) if operator is None else map(float, operator)
        if inner_solver == "gd":
            def solve(theta):
                return inner.solve_gd(task_loss, theta, x, y, lam=lam, steps=inner_steps,
                                      lr=inner_lr, max_grad_norm=max_grad_norm)
        else:
            def solve(theta):
                return inner.solve_hf(task_loss, theta, x, y, lam=lam, steps=inner_steps,
                                      cg_steps=inner_cg_steps, hvp_mode=hvp_mode)
    if not a > 0:
        raise ValueError(f"the operator's identity coefficient a must be > 0, got {a}")

    info: Dict[str, object] = {}
    cfg = dict(task_loss=task_loss, x=x, y=y, a=a, b=b, cg_steps=cg_steps, cg_tol=cg_tol,
               hvp_mode=hvp_mode, info=info)
    phi = _ImplicitMetaGrad.apply(task_loss.theta(), solve, cfg)
    return Adapted(task_loss, phi, info)
