"""The result of adaptation: T task-specific parameter sets and the model to run them."""
from __future__ import annotations

from typing import Dict

import torch

from .functional import TaskLoss

__all__ = ["Adapted"]


class Adapted:
    """Adapted parameters of T tasks.

    ``adapted(x)`` runs the model with task t's parameters on ``x[t]``
    (x ``[T, m, ...]`` -> ``[T, m, ...]``); ``flat`` is the ``[T, P]`` buffer
    (carrying the meta-gradient's autograd graph) and ``params`` its named
    ``[T, ...]`` views.  ``info`` holds solver diagnostics, per task.  From
    :func:`~imaml_ext.imaml` (keys and shapes also in
    :data:`imaml_ext.diagnostics.INFO_FIELDS`):

    * after the forward: ``"residual"`` ``[T]``, the relative stationarity
      residual ‖∇L̂(φ) + λ(φ − θ)‖/‖∇L̂(θ)‖ of the inner problem at the last
      iterate whose gradient the inner solver evaluated (for GD and HF the
      iterate before the last step; :mod:`imaml_ext.inner`);
      ``"residual_norm"`` ``[T]`` the same, absolute; ``"residual_at_theta"``
      ``[T]`` its value at θ; ``"inner_steps_taken"`` ``[T]`` int64;
    * after the backward: ``"linear_solve"`` (the linear solver's result),
      ``"cg"`` (:class:`~imaml_ext.solvers.CGResult`: ``x`` ``[T, P]``,
      ``iterations``, ``state``, ``residual_sq``, ``min_curvature``, each
      ``[T]``), ``"nonpositive_curvature"`` ``[T]`` bool (CG met pᵀAp ≤ 0),
      ``"min_rayleigh"`` ``[T]`` (smallest pᵀAp/pᵀp CG met, an upper bound
      on the smallest eigenvalue of A = I + H/λ).

    From :func:`~imaml_ext.maml`: ``"inner_losses"`` ``[K, T]`` and the
    inner solver's name.
    """

    def __init__(self, task_loss: TaskLoss, flat: torch.Tensor, info: Dict[str, object]):
        self.task_loss = task_loss
        self.flat = flat
        self.info = info

    @property
    def params(self) -> Dict[str, torch.Tensor]:
        return self.task_loss.layout.unflatten(self.flat)

    @property
    def num_tasks(self) -> int:
        return self.flat.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[0] != self.num_tasks:
            raise ValueError(
                f"expected inputs [T={self.num_tasks}, m, ...] with the task dimension first, "
                f"got shape {tuple(x.shape)}")
        return self.task_loss.outputs(self.flat, x)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-task losses ``[T]`` of the adapted parameters on (x, y)."""
        return self.task_loss.losses(self.flat, x, y)

    def __repr__(self) -> str:
        return f"Adapted(tasks={self.num_tasks}, params={self.flat.shape[1]}, dtype={self.flat.dtype})"
