"""When the implicit meta-gradient can be trusted: per-task diagnostics and their warning.

iMAML's meta-gradient g_t = (I + H_t/λ)⁻¹ ∇L_t(φ_t) is the derivative of the
query loss through φ_t*(θ) only when

1. φ_t is a stationary point of the regularised inner problem
   F_t(φ) = L̂_t(φ) + (λ/2)‖φ − θ‖², i.e. the *stationarity residual*
   ‖∇F_t(φ_t)‖ = ‖∇L̂_t(φ_t) + λ(φ_t − θ)‖ is small, measured here relative
   to its value at the start, ‖∇F_t(θ)‖ = ‖∇L̂_t(θ)‖;
2. the linear solve is one: CG on A_t = I + H_t/λ needs A_t positive
   definite, which a non-convex L̂ (or batch statistics) can break.  CG then
   meets a direction with pᵀAp ≤ 0 and stops with its last iterate.

:func:`~imaml_ext.imaml` records, per task, the numbers the inner solver and
CG already compute (no extra passes; the keys are listed in
:data:`INFO_FIELDS`), and after the backward solve :func:`check` raises
:class:`ImplicitGradientWarning` once per process when the median relative
residual exceeds :data:`RESIDUAL_WARN_THRESHOLD` or some task met
non-positive curvature.  Silence it with the usual filters, e.g.
``warnings.simplefilter("ignore", imaml_ext.ImplicitGradientWarning)``.
"""
from __future__ import annotations

import warnings
from typing import Dict, Mapping, Optional

import torch

from .ops import CGState

__all__ = ["ImplicitGradientWarning", "RESIDUAL_WARN_THRESHOLD", "INFO_FIELDS", "summary", "check"]

#: Median relative stationarity residual ‖∇F(φ)‖/‖∇F(θ)‖ above which the
#: implicit gradient is flagged: at 0.1 the inner solution is still 10 % of
#: its initial gradient away from stationarity.
RESIDUAL_WARN_THRESHOLD = 0.1

#: ``adapted.info`` keys written by :func:`~imaml_ext.imaml`, with their shapes (T tasks).
INFO_FIELDS: Dict[str, str] = {
    "residual": "[T] relative stationarity residual ‖∇L̂(φ) + λ(φ − θ)‖ / ‖∇L̂(θ)‖, at the last "
                "iterate whose gradient the inner solver evaluated (after the forward)",
    "residual_norm": "[T] the same residual, absolute (after the forward)",
    "residual_at_theta": "[T] ‖∇L̂(θ)‖, the residual at the start φ = θ (after the forward)",
    "inner_steps_taken": "[T] int64, inner steps a task moved before inner_tol stopped it "
                         "(= inner_steps without inner_tol) (after the forward)",
    "cg": "CGResult of the backward CG: x [T, P] (None with task_chunk: summed chunk by chunk, not kept), "
          "iterations [T], state [T] (CGState codes), "
          "residual_sq [T], min_curvature [T] (after the backward, linear_solver='cg')",
    "nonpositive_curvature": "[T] bool, the backward CG met pᵀAp ≤ 0 and stopped there (after the backward)",
    "min_rayleigh": "[T] smallest Rayleigh quotient pᵀAp/pᵀp of A = a·I + b·H over the backward "
                    "CG's search directions, an upper bound on A's smallest eigenvalue (after the backward)",
    "linear_solve": "what the linear solver returned (after the backward)",
}

# What to try, per problem found: the inner problem unsolved; A not positive definite
# (which the Gauss–Newton matrix rules out, so it is suggested only there).
_UNSOLVED_ADVICE = "more inner_steps, a smaller inner_lr, a larger lam, inner_solver='hf' or 'nesterov' (with inner_tol)"
_INDEFINITE_ADVICE = ("curvature='gauss_newton' (positive semi-definite for losses convex in the model outputs) "
                      "or a larger lam")


class ImplicitGradientWarning(UserWarning):
    """The implicit meta-gradient of some tasks is not the gradient it stands for:
    the inner problem is not solved, or the backward system is not positive definite."""


_warned = False


def record_inner(info: Dict[str, object], diagnostics: Mapping[str, torch.Tensor]) -> None:
    """Store an inner solver's per-task diagnostics (:func:`~imaml_ext.inner.solve_gd`'s
    ``diagnostics`` dict) in ``info`` under the :data:`INFO_FIELDS` names."""
    info["residual_norm"] = diagnostics["residual_norm"]
    info["residual_at_theta"] = diagnostics["residual_at_theta"]
    info["residual"] = diagnostics["residual_norm"] / diagnostics["residual_at_theta"].clamp_min(
        torch.finfo(diagnostics["residual_norm"].dtype).tiny)
    info["inner_steps_taken"] = diagnostics["steps_taken"]


def record_cg(info: Dict[str, object], result) -> None:
    """Store the backward CG's per-task curvature indicators in ``info``."""
    info["nonpositive_curvature"] = result.state == CGState.NONPOSITIVE_CURVATURE
    if result.min_curvature is not None:
        info["min_rayleigh"] = result.min_curvature


def summary(info: Mapping[str, object]) -> Dict[str, Optional[float]]:
    """Scalars over the tasks for logging: median and max relative residual,
    the number of tasks whose CG met pᵀAp ≤ 0 and the smallest Rayleigh
    quotient; a key is missing where ``info`` lacks its source."""
    out: Dict[str, Optional[float]] = {}
    residual = info.get("residual")
    if isinstance(residual, torch.Tensor):
        out["residual_median"] = float(residual.median())
        out["residual_max"] = float(residual.max())
    bad = info.get("nonpositive_curvature")
    if isinstance(bad, torch.Tensor):
        out["nonpositive_tasks"] = int(bad.sum())
    rayleigh = info.get("min_rayleigh")
    if isinstance(rayleigh, torch.Tensor):
        out["min_rayleigh"] = float(rayleigh.min())
    return out


def check(info: Mapping[str, object], threshold: float = RESIDUAL_WARN_THRESHOLD) -> None:
    """Warn (:class:`ImplicitGradientWarning`, once per process) if the median
    relative residual exceeds ``threshold`` or some task met non-positive
    curvature.  Until it has warned, one host synchronisation (a single
    boolean decided on the device); after that, none."""
    global _warned
    if _warned:
        return
    residual = info.get("residual")
    nonpositive = info.get("nonpositive_curvature")
    flags = []
    if isinstance(residual, torch.Tensor):
        flags.append((residual.median() > threshold).reshape(1))
    if isinstance(nonpositive, torch.Tensor):
        flags.append(nonpositive.any().reshape(1))
    if not flags or not bool(torch.cat(flags).any()):
        return
    _warned = True
    stats = summary(info)
    median = stats.get("residual_median")
    curvature = stats.get("nonpositive_tasks") or 0
    tasks = (residual if isinstance(residual, torch.Tensor) else nonpositive).numel()
    parts, advice = [], []
    if median is not None and median > threshold:
        advice.append(_UNSOLVED_ADVICE)
        unsolved = int((residual > threshold).sum())
        parts.append(f"the inner problem is not solved: median relative stationarity residual "
                     f"‖∇L̂(φ) + λ(φ − θ)‖/‖∇L̂(θ)‖ = {median:.3g} > {threshold:g} "
                     f"({unsolved} of {tasks} tasks above)")
    if curvature:
        advice.append(_INDEFINITE_ADVICE)
        parts.append(f"{curvature} of {tasks} tasks met non-positive curvature (pᵀAp ≤ 0, "
                     f"smallest Rayleigh quotient {stats.get('min_rayleigh', float('nan')):.3g}) in the "
                     f"backward CG, so I + H/λ is not positive definite there")
    warnings.warn("iMAML's implicit meta-gradient is unreliable: " + "; ".join(parts) +
                  f". Try {'; or '.join(advice)}. adapted.info holds the per-task numbers "
                  f"(imaml_ext.diagnostics.INFO_FIELDS). Shown once per process.",
                  ImplicitGradientWarning, stacklevel=5)  # past record, solve and the Function's backward
