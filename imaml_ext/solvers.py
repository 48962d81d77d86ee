"""Batched conjugate gradient for T independent linear systems.

Solves (shift·I + scale·M_t) x_t = rhs_t for every task t at once, where
``matvec`` applies all M_t together (``[T, P] -> [T, P]``), typically the
batched Hessian-vector product of :mod:`imaml_ext.hvp`.  The per-task
scalars live on the device and, without a tolerance, the loop has a fixed
length, so it never waits for the host; with one, the host asks every
:data:`CG_HOST_CHECK_EVERY` iterations whether any task still runs and ends
the loop when none does.  Each task stops on its own (see :class:`~imaml_ext.ops.CGState`):
converged, or pᵀAp ≤ 0 — a non-convex loss can make A indefinite, and the
last iterate is then kept — or a non-finite pᵀAp.  The vector algebra of one
iteration is the fused op :func:`imaml_ext.ops.cg_step_`.

The linear solvers of iMAML's backward pass (``imaml(..., linear_solver=)``)
are callables ``solver(matvec, rhs) -> result`` over ``[T, P]``, where
``matvec(v)`` applies A_t to row t of v and ``result`` is the solution
``[T, P]`` or an object carrying it as ``.x``.  Built in: :class:`CG`
(the default, :func:`cg`) and :class:`Neumann` (a truncated Neumann
series), each a small frozen dataclass holding its settings.  iMAML passes
them a :class:`ShiftedOperator` (A = shift·I + scale·M, itself a plain
``matvec``), which the built-ins apply with one product by M per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import ops
from .ops import CGState
from .validation import check_nonnegative, check_positive, check_steps

__all__ = ["cg", "CGResult", "CGState", "CG", "Neumann", "ImamlDevCG", "IMAML_DEV_RESIDUAL_TOL",
           "ShiftedOperator", "Matvec", "CG_HOST_CHECK_EVERY"]

Matvec = Callable[[torch.Tensor], torch.Tensor]

#: With a tolerance, :func:`cg` asks the host every this many iterations whether
#: any task still runs (one device sync each time): a few wasted iterations at
#: most, against a sync per iteration.
CG_HOST_CHECK_EVERY = 8


@dataclass
class CGResult:
    """Solution and per-task diagnostics of :func:`cg`.

    x: ``[T, P]`` solution (None where it was not kept: :func:`~imaml_ext.imaml`'s
    backward with ``task_chunk`` sums it chunk by chunk); iterations: ``[T]`` int64, steps taken per task;
    state: ``[T]`` int32, one of the :class:`CGState` codes;
    residual_sq: ``[T]``, ‖rhs − A x‖² as tracked by the recurrence;
    min_curvature: ``[T]``, the smallest Rayleigh quotient pᵀAp/pᵀp over the
    search directions p a task evaluated (+inf if none), an upper bound on
    the smallest eigenvalue of A_t, ≤ 0 where the task met pᵀAp ≤ 0
    (None from solvers that do not track it).
    """

    x: Optional[torch.Tensor]
    iterations: torch.Tensor
    state: torch.Tensor
    residual_sq: torch.Tensor
    min_curvature: Optional[torch.Tensor] = None

    def summary(self) -> str:
        """One line per distinct outcome, e.g. ``'30 tasks converged; 2 tasks stopped: pᵀAp ≤ 0'``."""
        states = self.state.tolist()
        return "; ".join(f"{states.count(s)} task{'s' if states.count(s) > 1 else ''} {CGState(s).description}"
                         for s in sorted(set(states)))


def cg(matvec: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, *,
       shift: float = 0.0, scale: float = 1.0, x0: Optional[torch.Tensor] = None,
       max_iter: int = 10, tol: Optional[float] = None) -> CGResult:
    """Conjugate gradient on (shift·I + scale·M) x = rhs, batched over rows.

    Args:
        matvec: ``v [T, P] -> M v [T, P]``, row t multiplied by M_t.
        rhs: ``[T, P]`` right-hand sides.
        shift, scale: the operator is A = shift·I + scale·M (iMAML: 1 and 1/λ).
        x0: ``[T, P]`` starting point; zeros if omitted (costs no matvec).
        max_iter: the most iterations; tasks may stop earlier.
        tol: a task stops once ‖r_t‖ ≤ tol·‖rhs_t‖, and the loop once every
            task has stopped (checked on the host every
            :data:`CG_HOST_CHECK_EVERY` iterations, never while torch.compile
            traces). None (or 0) runs all ``max_iter`` iterations without a
            host sync, stopping a task only at an exactly zero residual.

    Returns:
        :class:`CGResult`.
    """
    if rhs.dim() != 2:
        raise ValueError(f"rhs must be [T, P], got shape {tuple(rhs.shape)}")
    if not rhs.is_floating_point():
        raise TypeError(f"rhs must be floating point, got {rhs.dtype}")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if tol is None:
        tol = 0.0
    elif tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    rhs = rhs.detach().contiguous()
    if x0 is None:
        x = torch.zeros_like(rhs)
        r = rhs.clone()
    else:
        if x0.shape != rhs.shape:
            raise ValueError(f"x0 has shape {tuple(x0.shape)}, rhs has {tuple(rhs.shape)}")
        x = x0.detach().to(rhs.dtype).contiguous().clone()
        r = rhs - (shift * x + scale * matvec(x))
    p = r.clone()
    rs = ops.batched_sq_norm(r)
    threshold_sq = (tol * tol) * ops.batched_sq_norm(rhs)
    state = torch.where(rs <= threshold_sq, int(CGState.CONVERGED), int(CGState.RUNNING)).to(torch.int32)
    iterations = torch.zeros(rhs.shape[0], dtype=torch.int64, device=rhs.device)
    min_curvature = torch.full_like(rs, float("inf"))
    check_on_host = tol > 0 and not torch.compiler.is_compiling()
    for k in range(max_iter):
        # A stopped task never runs again: once none runs, the rest would be no-ops.
        running = state == int(CGState.RUNNING)
        if check_on_host and k % CG_HOST_CHECK_EVERY == 0 and not running.any():
            break
        iterations += running
        hp = matvec(p)
        min_curvature = _track_curvature(min_curvature, running, p, hp, shift, scale)
        ops.cg_step_(x, r, p, hp, rs, state, threshold_sq, shift, scale)
    # A task stopped on curvature did not take the step it was counted for.
    iterations -= (state >= int(CGState.NONPOSITIVE_CURVATURE)).long()
    return CGResult(x=x, iterations=iterations, state=state, residual_sq=rs, min_curvature=min_curvature)


def _track_curvature(smallest: torch.Tensor, running: torch.Tensor, p: torch.Tensor, hp: torch.Tensor,
                     shift: float, scale: float) -> torch.Tensor:
    """min(smallest, pᵀAp/pᵀp) for the running tasks, A = shift·I + scale·M, ``[T]``
    (two batched reductions, on the device)."""
    pp = ops.batched_sq_norm(p)
    rayleigh = shift + scale * ops.batched_dot(p, hp.contiguous()) / pp
    return torch.where(running & (pp > 0), torch.minimum(smallest, rayleigh), smallest)


@dataclass(frozen=True)
class ShiftedOperator:
    """A = shift·I + scale·M on ``[T, P]``, with ``m(v)`` applying every M_t at once.

    Calling it applies A (one product by M), so any ``(matvec, rhs)`` solver
    can use it as its ``matvec``; the built-in solvers read ``shift``,
    ``scale`` and ``m`` to fuse the combination into their own update.
    """

    m: Matvec
    shift: float = 0.0
    scale: float = 1.0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.shift * v + self.scale * self.m(v)


@dataclass(frozen=True)
class CG:
    """Linear solver: :func:`cg` from x₀ = 0, ``max_iter`` iterations (one
    matvec each), a task stopping once ‖r_t‖ ≤ tol·‖rhs_t‖ (``tol`` None:
    never early).  Returns a :class:`CGResult`."""

    max_iter: int = 5
    tol: Optional[float] = None

    def __post_init__(self):
        check_steps("CG.max_iter", self.max_iter, minimum=1)
        if self.tol is not None:
            check_nonnegative("CG.tol", self.tol)

    def __call__(self, matvec: Matvec, rhs: torch.Tensor) -> CGResult:
        if isinstance(matvec, ShiftedOperator):
            return cg(matvec.m, rhs, shift=matvec.shift, scale=matvec.scale,
                      max_iter=self.max_iter, tol=self.tol)
        return cg(matvec, rhs, max_iter=self.max_iter, tol=self.tol)


#: The official iMAML code's CG stopping threshold on rᵀr (absolute; utils.cg_solve's residual_tol).
IMAML_DEV_RESIDUAL_TOL = 1e-10


@dataclass(frozen=True)
class ImamlDevCG:
    """Linear solver: conjugate gradient exactly as the official iMAML code
    (aravindr93/imaml_dev, ``utils.cg_solve`` called from its training loop)
    runs it, batched over tasks; :func:`~imaml_ext.imaml` uses it with
    ``compat="imaml_dev"``.

    * ``max_iter`` ≤ 1: no solve, the right-hand side is returned as it is
      (the official loop uses the raw query gradient when ``cg_steps <= 1``).
    * Otherwise, from x₀ = 0, up to ``max_iter`` iterations per task; a task
      stops after the iteration whose new rᵀr is below ``residual_tol``
      (absolute, strict), with no test before the first iteration and no
      stop on pᵀAp ≤ 0 or non-finite values (they propagate, as there).
      A task whose right-hand side is exactly zero gets x = 0 (its CG would
      divide 0 by 0; the official loop only solves for tasks in the loss).

    The official code solves with each task's own query gradient g_t and
    averages the solutions over the tasks afterwards; a backward pass gets
    rhs_t = ``rhs_scale``·g_t instead (1/T for a mean over T tasks), and CG
    commutes with that scaling but for the absolute threshold, which is
    therefore applied as rᵀr < ``residual_tol``·``rhs_scale``².

    All per-task decisions stay on the device.  Returns a :class:`CGResult`
    (state CONVERGED for a task that met the threshold, else RUNNING), or
    the ``[T, P]`` right-hand side itself when there is no solve.
    """

    max_iter: int
    residual_tol: float = IMAML_DEV_RESIDUAL_TOL
    rhs_scale: float = 1.0

    def __post_init__(self):
        check_steps("ImamlDevCG.max_iter", self.max_iter)
        check_nonnegative("ImamlDevCG.residual_tol", self.residual_tol)
        check_positive("ImamlDevCG.rhs_scale", self.rhs_scale)

    def __call__(self, matvec: Matvec, rhs: torch.Tensor):
        if rhs.dim() != 2:
            raise ValueError(f"rhs must be [T, P], got shape {tuple(rhs.shape)}")
        rhs = rhs.detach()
        if self.max_iter <= 1:
            return rhs.clone()
        x = torch.zeros_like(rhs)
        r = rhs.clone()
        p = r.clone()
        rs = ops.batched_sq_norm(r.contiguous())
        # A task with an exactly zero right-hand side (one the loss leaves out)
        # is solved by x = 0; the official loop never runs CG for it.
        running = rs != 0
        iterations = torch.zeros(rhs.shape[0], dtype=torch.int64, device=rhs.device)
        threshold = self.residual_tol * self.rhs_scale ** 2
        for _ in range(self.max_iter):
            ap = matvec(p)
            alpha = (rs / ops.batched_dot(p.contiguous(), ap.contiguous())).unsqueeze(1)
            step = running.unsqueeze(1)
            x = torch.where(step, x + alpha * p, x)
            r_new = torch.where(step, r - alpha * ap, r)
            rs_new = ops.batched_sq_norm(r_new.contiguous())
            p = torch.where(step, r_new + (rs_new / rs).unsqueeze(1) * p, p)
            r = r_new
            iterations += running
            rs = torch.where(running, rs_new, rs)
            running = running & ~(rs_new < threshold)
        state = torch.where(running, int(CGState.RUNNING), int(CGState.CONVERGED)).to(torch.int32)
        return CGResult(x=x, iterations=iterations, state=state, residual_sq=rs)


@dataclass(frozen=True)
class Neumann:
    """Linear solver: the truncated Neumann series

        x = α Σ_{k=0}^{K} (I − αA)^k rhs,   K = ``steps``,

    which converges to A⁻¹ rhs as K grows when the spectral radius of
    I − αA is below 1 (for symmetric A with eigenvalues in [μ, L], μ > 0:
    0 < α < 2/L; the error then falls as ρ^(K+1), ρ = max|1 − αλ_i(A)|).
    Cost: K matvecs (one per term after the first), two ``[T, P]`` buffers,
    no inner products.  For iMAML's A = I + H/λ with H ⪰ 0, α = 1 converges
    when ‖H‖ < λ.  Used for implicit hyper-gradients by Lorraine, Vicol and
    Duvenaud (2020).  Returns the ``[T, P]`` solution.  A non-finite value
    in a task's rhs or products stays in that task's row.
    """

    steps: int = 20
    alpha: float = 0.5

    def __post_init__(self):
        check_steps("Neumann.steps", self.steps)
        check_positive("Neumann.alpha", self.alpha)

    def __call__(self, matvec: Matvec, rhs: torch.Tensor) -> torch.Tensor:
        if rhs.dim() != 2:
            raise ValueError(f"rhs must be [T, P], got shape {tuple(rhs.shape)}")
        alpha = float(self.alpha)
        term = rhs.detach().clone()
        total = term.clone()
        if isinstance(matvec, ShiftedOperator):
            # (I − αA) v = (1 − α·shift) v − α·scale·M v
            keep, mix = 1.0 - alpha * matvec.shift, -alpha * matvec.scale
            for _ in range(self.steps):
                hv = matvec.m(term)
                term = torch.add(term * keep, hv, alpha=mix)
                total += term
        else:
            for _ in range(self.steps):
                term = torch.add(term, matvec(term), alpha=-alpha)
                total += term
        return total.mul_(alpha)
