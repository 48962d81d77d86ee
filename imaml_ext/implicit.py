"""Implicit MAML (Rajeswaran et al., 2019) as a ``torch.autograd.Function``.

Forward: solve every task's inner problem (:mod:`imaml_ext.inner`) with no
graph, returning φ* ``[T, P]``.  Backward: by the implicit function theorem
(the paper's Lemma 1), dφ_t*/dθ = (I + H_t/λ)⁻¹ with H_t = ∇²L̂_t(φ_t*),
which is symmetric, so the meta-gradient is

    ∂L/∂θ = Σ_t A_t⁻¹ ∂L/∂φ_t,   A_t = a·I + b·H_t   (a = 1, b = 1/λ),

with each A_t⁻¹ applied by a linear solver from x₀ = 0: batched conjugate
gradient by default, or any ``(matvec, rhs) -> x`` (:mod:`imaml_ext.solvers`),
as in JAXopt's and TorchOpt's implicit differentiation: the Function only
builds the operator A (one batched HVP per product) and hands it to the
solver.  Memory does not depend on the number of inner steps.

The Function is written in the ``setup_context`` form, so ``torch.func.grad``
and ``torch.func.vjp`` can be taken through :func:`imaml` when the model's
parameters are supplied with ``torch.func.functional_call`` (tested against
``.backward()`` in float64); inside such a transform ``hvp_mode="auto"``
uses the forward-over-reverse HVP.  It has no vmap rule: the inner loop
checks for non-finite losses on the host, which ``vmap`` does not allow.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import inner
from .adapted import Adapted
from .functional import TaskLoss
from .hvp import HVP_MODES, make_hvp
from .solvers import (CG, IMAML_DEV_RESIDUAL_TOL, CGResult, CGState, ImamlDevCG, Matvec,
                      ShiftedOperator)
from .validation import (INNER_LR_RULE, check_nonnegative, check_positive, check_steps, check_task_batch,
                         optional_positive)

__all__ = ["imaml", "INNER_SOLVERS", "LinearSolver"]

INNER_SOLVERS = ("gd", "hf")
COMPAT_MODES = (None, "imaml_dev")
LinearSolver = Callable[[Matvec, torch.Tensor], object]
_CG_STEPS_DEFAULT = 5


@dataclass
class _ImplicitSystem:
    """What the backward pass needs: the support data and loss for the HVP,
    the operator A = a·I + b·H, the linear solver and where to record its result."""

    task_loss: TaskLoss
    x: torch.Tensor
    y: torch.Tensor
    a: float
    b: float
    hvp_mode: str
    solver: LinearSolver
    info: Dict[str, object]

    def solve(self, phi: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """A_t⁻¹ rhs_t for every task, at φ* ``[T, P]``; records the solver's result."""
        hvp = make_hvp(self.task_loss.per_task, phi, self.x, self.y, self.hvp_mode)
        result = self.solver(ShiftedOperator(hvp, self.a, self.b), rhs)
        self.info["linear_solve"] = result
        x = result if isinstance(result, torch.Tensor) else getattr(result, "x", None)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"linear_solver must return the solution [T, P] or an object with it as "
                            f".x; got {type(result).__name__}")
        if x.shape != rhs.shape:
            raise ValueError(f"linear_solver returned shape {tuple(x.shape)}, expected [T, P] = "
                             f"{tuple(rhs.shape)}")
        if isinstance(result, CGResult):
            self.info["cg"] = result
            # A task whose CG met a non-finite value (a NaN query gradient, say)
            # contributes NaN, as a differentiated loop would: never a silent 0.
            x = torch.where((result.state == CGState.NONFINITE)[:, None], torch.nan, x)
        return x


class _ImplicitMetaGrad(torch.autograd.Function):
    """theta [P] -> phi* [T, P]; backward applies Σ_t A_t⁻¹ to the incoming gradient."""

    @staticmethod
    def forward(theta: torch.Tensor, solve: Callable[[torch.Tensor], torch.Tensor],
                system: _ImplicitSystem) -> torch.Tensor:
        return solve(theta)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.system = inputs[2]
        ctx.save_for_backward(output)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_phi: torch.Tensor):
        (phi,) = ctx.saved_tensors
        return ctx.system.solve(phi, grad_phi.contiguous()).sum(0), None, None


def _linear_solver(linear_solver: Union[str, LinearSolver], cg_steps: int,
                   cg_tol: Optional[float], compat: Optional[str], num_tasks: int) -> LinearSolver:
    """``"cg"`` -> CG(cg_steps, cg_tol), or with ``compat="imaml_dev"`` the
    official code's CG for a meta-loss averaged over the tasks; a callable is
    used as it is."""
    if isinstance(linear_solver, str):
        if linear_solver != "cg":
            raise ValueError(f"linear_solver must be 'cg', a solver object such as "
                             f"imaml_ext.solvers.Neumann(steps=..., alpha=...), or a callable "
                             f"(matvec, rhs) -> x; got {linear_solver!r}")
        if compat != "imaml_dev":
            return CG(max_iter=cg_steps, tol=cg_tol)
        if cg_tol is not None:
            raise ValueError(f"compat='imaml_dev' stops CG as the official code does (a task once "
                             f"its rᵀr < {IMAML_DEV_RESIDUAL_TOL:g}); cg_tol applies without compat")
        return ImamlDevCG(max_iter=cg_steps, rhs_scale=1.0 / num_tasks)
    if isinstance(linear_solver, type):
        raise TypeError(f"linear_solver takes a solver object, not its class: pass "
                        f"{linear_solver.__name__}(...), e.g. imaml_ext.solvers.Neumann(steps=20, alpha=0.5)")
    if not callable(linear_solver):
        raise TypeError(f"linear_solver must be 'cg' or a callable (matvec, rhs) -> x, "
                        f"got {type(linear_solver).__name__}")
    if cg_steps != _CG_STEPS_DEFAULT or cg_tol is not None:
        raise ValueError("cg_steps and cg_tol configure linear_solver='cg'; with another "
                         "linear_solver, configure it instead (e.g. imaml_ext.solvers.CG(max_iter=..., tol=...))")
    return linear_solver


def imaml(model: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor,
          loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy, *,
          lam: float = 2.0, inner_steps: int = 16, inner_lr: float = 0.1,
          inner_solver: str = "gd", linear_solver: Union[str, LinearSolver] = "cg",
          cg_steps: int = _CG_STEPS_DEFAULT, cg_tol: Optional[float] = None,
          inner_cg_steps: int = 5, max_grad_norm: Optional[float] = None, hvp_mode: str = "auto",
          operator: Optional[tuple] = None, compat: Optional[str] = None,
          cg_damping: Optional[float] = None) -> Adapted:
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
        inner_lr: GD step size > 0 (``"gd"`` and ``compat="imaml_dev"``); for no
            adaptation pass ``inner_steps=0`` (the same rule as :func:`~imaml_ext.maml`).
        inner_solver: ``"gd"`` or ``"hf"`` (see :mod:`imaml_ext.inner`).
        linear_solver: how the backward pass solves A_t x_t = ∂L/∂φ_t:
            ``"cg"`` (batched CG configured by ``cg_steps``/``cg_tol``), a
            solver object from :mod:`imaml_ext.solvers` (``CG(max_iter, tol)``,
            ``Neumann(steps, alpha)``), or any callable
            ``(matvec, rhs) -> x`` where ``matvec`` applies A to ``[T, P]``
            and ``x`` is ``[T, P]`` (or an object with it as ``.x``).
        cg_steps: CG iterations of the backward solve (≥ 1), for ``"cg"``.
        cg_tol: relative residual at which a task's backward CG stops early;
            None: never early.  For ``"cg"``.
        inner_cg_steps: CG iterations per Newton step of ``"hf"``.
        max_grad_norm: clips each task's inner gradient to this global norm
            (``"gd"``); None: no clipping.
        hvp_mode: ``"reverse"``, ``"forward"`` or ``"auto"`` (:mod:`imaml_ext.hvp`).
        operator: ``(a, b)`` to solve with A = a·I + b·H instead of I + H/λ.
        compat: ``"imaml_dev"`` reproduces the meta-gradient of the official
            iMAML code (aravindr93/imaml_dev), which differs from the paper in
            four ways, all four reproduced: (1) the inner loop is plain GD on
            the unregularised L̂, then one pull-back step φ ← φ − α·λ(φ − θ);
            (2) the system is A = (1 + cg_damping)·I + H/(λ + 10) instead of
            I + H/λ; (3) CG stops a task once its rᵀr < 1e-10 (absolute),
            with no stop on pᵀAp ≤ 0 (:class:`~imaml_ext.solvers.ImamlDevCG`;
            ``cg_tol`` is refused); (4) ``cg_steps`` ≤ 1 means no solve: the
            query gradient as it is (``cg_steps=0`` is accepted only here).
            The official code averages the tasks' solutions, so the backward
            is assumed to start from a meta-loss that is the mean over the T
            tasks (the threshold of (3) is applied to T·∂L/∂φ_t).
            Within float64 rounding no difference remains
            (tests/test_imaml_dev_compat.py restates the official algorithm).
            Not covered: the official evaluation's character split, which
            differs from its training split; this project has one fixed split.
            Never the default; use it only to compare with that code.
        cg_damping: d in the ``"imaml_dev"`` operator (default 1.0, the
            official code's); only with ``compat="imaml_dev"``.

    Numbers may be Python, NumPy or 0-dim tensor scalars.
    An explicit ``cg_tol=0`` or ``max_grad_norm=0`` (the old spelling of
    "off") still means off, with a DeprecationWarning.

    Returns:
        :class:`~imaml_ext.adapted.Adapted`; after ``backward()``,
        ``adapted.info["linear_solve"]`` holds what the linear solver
        returned (for CG a :class:`~imaml_ext.solvers.CGResult` with the
        per-task outcome, also under ``info["cg"]``).
    """
    task_loss = TaskLoss(model, loss_fn)
    check_task_batch(task_loss, support_x, support_y)
    lam = check_positive("lam", lam)
    inner_lr = check_positive("inner_lr", inner_lr, INNER_LR_RULE)
    inner_steps = check_steps("inner_steps", inner_steps)
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
    # compat="imaml_dev": cg_steps ≤ 1 is no solve, as in the official loop.
    cg_steps = check_steps("cg_steps", cg_steps, minimum=0 if compat == "imaml_dev" else 1,
                           hint="" if compat == "imaml_dev" else " (0 CG steps would give a zero meta-gradient)")
    inner_cg_steps = check_steps("inner_cg_steps", inner_cg_steps)
    cg_tol = optional_positive("cg_tol", cg_tol)
    max_grad_norm = optional_positive("max_grad_norm", max_grad_norm)
    solver = _linear_solver(linear_solver, cg_steps, cg_tol, compat, support_x.shape[0])
    if inner_solver not in INNER_SOLVERS:
        raise ValueError(f"inner_solver must be one of {INNER_SOLVERS}, got {inner_solver!r}")
    if hvp_mode not in HVP_MODES + ("auto",):
        raise ValueError(f"hvp_mode must be one of {HVP_MODES + ('auto',)}, got {hvp_mode!r}")
    if cg_damping is not None and compat != "imaml_dev":
        raise ValueError("cg_damping is the damping of compat='imaml_dev''s operator; it applies "
                         "only with compat='imaml_dev' (use operator=(a, b) otherwise)")
    if inner_solver == "hf" and compat == "imaml_dev":
        raise ValueError("compat='imaml_dev' runs the official code's GD inner loop; "
                         "use inner_solver='gd' with it")
    if inner_solver == "hf" and max_grad_norm is not None:
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
        cg_damping = 1.0 if cg_damping is None else cg_damping
        cg_damping = check_nonnegative("cg_damping", cg_damping)
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
    system = _ImplicitSystem(task_loss=task_loss, x=x, y=y, a=a, b=b, hvp_mode=hvp_mode,
                             solver=solver, info=info)
    phi = _ImplicitMetaGrad.apply(task_loss.theta(), solve, system)
    return Adapted(task_loss, phi, info)
