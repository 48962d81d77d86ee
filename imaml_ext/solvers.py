"""Batched conjugate gradient for T independent linear systems.

Solves (shift·I + scale·M_t) x_t = rhs_t for every task t at once, where
``matvec`` applies all M_t together (``[T, P] -> [T, P]``), typically the
batched Hessian-vector product of :mod:`imaml_ext.hvp`.  The per-task
scalars live on the device and the loop has a fixed length, so it never
waits for the host.  Each task stops on its own (see :class:`~imaml_ext.ops.CGState`):
converged, or pᵀAp ≤ 0 — a non-convex loss can make A indefinite, and the
last iterate is then kept — or a non-finite pᵀAp.  The vector algebra of one
iteration is the fused op :func:`imaml_ext.ops.cg_step_`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import ops
from .ops import CGState

__all__ = ["cg", "CGResult", "CGState"]


@dataclass
class CGResult:
    """Solution and per-task diagnostics of :func:`cg`.

    x: ``[T, P]`` solution; iterations: ``[T]`` int64, steps taken per task;
    state: ``[T]`` int32, one of the :class:`CGState` codes;
    residual_sq: ``[T]``, ‖rhs − A x‖² as tracked by the recurrence.
    """

    x: torch.Tensor
    iterations: torch.Tensor
    state: torch.Tensor
    residual_sq: torch.Tensor

    def summary(self) -> str:
        """One line per distinct outcome, e.g. ``'30 tasks converged; 2 tasks stopped: pᵀAp ≤ 0'``."""
        states = self.state.tolist()
        return "; ".join(f"{states.count(s)} task{'s' if states.count(s) > 1 else ''} {CGState(s).description}"
                         for s in sorted(set(states)))


def cg(matvec: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, *,
       shift: float = 0.0, scale: float = 1.0, x0: Optional[torch.Tensor] = None,
       max_iter: int = 10, tol: float = 0.0) -> CGResult:
    """Conjugate gradient on (shift·I + scale·M) x = rhs, batched over rows.

    Args:
        matvec: ``v [T, P] -> M v [T, P]``, row t multiplied by M_t.
        rhs: ``[T, P]`` right-hand sides.
        shift, scale: the operator is A = shift·I + scale·M (iMAML: 1 and 1/λ).
        x0: ``[T, P]`` starting point; zeros if omitted (costs no matvec).
        max_iter: number of iterations (fixed; tasks may stop earlier).
        tol: a task stops once ‖r_t‖ ≤ tol·‖rhs_t‖ (0 runs all iterations).

    Returns:
        :class:`CGResult`.
    """
    if rhs.dim() != 2:
        raise ValueError(f"rhs must be [T, P], got shape {tuple(rhs.shape)}")
    if not rhs.is_floating_point():
        raise TypeError(f"rhs must be floating point, got {rhs.dtype}")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if tol < 0:
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
    for _ in range(max_iter):
        iterations += state == CGState.RUNNING
        ops.cg_step_(x, r, p, matvec(p), rs, state, threshold_sq, shift, scale)
    # A task stopped on curvature did not take the step it was counted for.
    iterations -= (state >= CGState.NONPOSITIVE_CURVATURE).long()
    return CGResult(x=x, iterations=iterations, state=state, residual_sq=rs)
