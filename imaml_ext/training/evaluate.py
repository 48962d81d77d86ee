"""Test-time adaptation and few-shot evaluation over many tasks.

Adaptation needs no meta-gradient, so it calls the inner solvers directly,
as each method's entry in :data:`~imaml_ext.training.methods.METHODS` says:

* iMAML-GD: gradient descent on the regularised objective
  L̂(φ) + (λ/2)‖φ − θ‖² from θ (:func:`imaml_ext.inner.solve_gd`);
* iMAML-HF: Hessian-free Newton on the same objective (:func:`~imaml_ext.inner.solve_hf`);
* MAML, first-order MAML, checkpointed MAML, Reptile: plain SGD steps on
  L̂ with the inner learning rate (``solve_gd`` with λ = 0).

The result says which adaptation ran (:func:`adaptation_text`) and, for
iMAML, how well the inner problem was solved: the median relative
stationarity residual ‖∇L̂(φ) + λ(φ − θ)‖/‖∇L̂(θ)‖ of the adapted φ
(:func:`inner_residual`, one extra gradient per batch of tasks).

A score is reported as mean ± 1.96·s/√n over n tasks, s the standard
deviation of the per-task scores (n − 1 in the denominator): query accuracy
for classification, query MSE for regression.

Inside a ``torch.distributed`` process group every process draws the same
batches of tasks and adapts its slice of each (:func:`~imaml_ext.distributed.split_tasks`);
the per-task scores are summed into one vector in task order, so the scores
are those of one process.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import split_tasks, world
from ..functional import TaskLoss
from .experiment import TrainConfig, is_classification, loss_function
from .methods import ADAPTATIONS, describe_adaptation, get_method
from .parallel import sum_over_ranks

__all__ = ["adapt", "adaptation_text", "inner_residual", "task_scores", "Score", "summarize", "evaluate"]


def adapt(cfg: TrainConfig, model: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor,
          inner_steps: Optional[int] = None, method: Optional[str] = None) -> torch.Tensor:
    """Each task's adapted parameters ``[T, P]`` from the model's θ.

    support_x / support_y ``[T, n, ...]``; ``inner_steps`` defaults to the
    training value, ``method`` to ``cfg.method`` (``"sgd"`` forces plain SGD).
    """
    method = cfg.method if method is None else method
    steps = cfg.inner_steps if inner_steps is None else inner_steps
    task_loss = TaskLoss(model, loss_function(cfg))
    theta = task_loss.theta().detach()
    run = ADAPTATIONS["sgd"] if method == "sgd" else get_method(method).adapt_for_test
    return run(cfg, task_loss, theta, support_x, support_y, steps)


def _adaptation(cfg: TrainConfig, method: Optional[str]) -> str:
    method = cfg.method if method is None else method
    return "sgd" if method == "sgd" else get_method(method).adaptation


def adaptation_text(cfg: TrainConfig, steps: int, method: Optional[str] = None) -> str:
    """How :func:`adapt` adapts (``method`` as there), e.g. for the output of evaluation."""
    return describe_adaptation(cfg, _adaptation(cfg, method), steps)


def inner_residual(cfg: TrainConfig, model: nn.Module, phi: torch.Tensor, support_x: torch.Tensor,
                   support_y: torch.Tensor) -> torch.Tensor:
    """Relative stationarity residual ``[T]`` of iMAML's inner problem at ``phi`` [T, P]:
    ‖∇L̂(φ) + λ(φ − θ)‖ / ‖∇L̂(θ)‖ with λ = ``cfg.lam`` and θ the model's parameters."""
    task_loss = TaskLoss(model, loss_function(cfg))
    theta = task_loss.theta().detach()
    g, _ = task_loss.grad(phi, support_x, support_y)
    g0, _ = task_loss.grad(theta.expand_as(phi).contiguous(), support_x, support_y)
    return (g + cfg.lam * (phi - theta)).norm(dim=1) / g0.norm(dim=1)


def task_scores(cfg: TrainConfig, model: nn.Module, phi: torch.Tensor, query_x: torch.Tensor,
                query_y: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-task query loss ``[T]`` and, for classification, accuracy ``[T]`` of ``phi`` [T, P]."""
    task_loss = TaskLoss(model, loss_function(cfg))
    with torch.no_grad():
        out = task_loss.outputs(phi, query_x)
        scores = {"loss": task_loss.losses(phi, query_x, query_y)}
        if is_classification(cfg):
            scores["acc"] = (out.argmax(-1) == query_y).float().mean(1)
    return scores


@dataclass
class Score:
    """mean ± ci95 of a per-task score over n tasks."""

    mean: float
    ci95: float
    std: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.ci95:.4f}"


def summarize(values: torch.Tensor) -> Score:
    """Score of per-task values [n]: mean ± 1.96·std/√n (std with n − 1)."""
    values = values.double().flatten()
    n = values.numel()
    std = float(values.std()) if n > 1 else 0.0
    return Score(mean=float(values.mean()), ci95=1.96 * std / math.sqrt(n), std=std, n=n)


def evaluate(cfg: TrainConfig, model: nn.Module, sampler: Any, num_tasks: int = 600, batch: int = 50,
             inner_steps: Optional[int] = None, progress: bool = False) -> Dict[str, Any]:
    """Adapt to ``num_tasks`` tasks from ``sampler`` (``batch`` at a time) and score the queries.

    Returns a dict with ``loss`` (and ``acc`` for classification) as
    :class:`Score` dicts, ``per_task`` (the same keys: lists of the
    ``num_tasks`` values in task order), the number of tasks, the inner
    steps used, ``adaptation`` (:func:`adaptation_text`), for iMAML
    ``inner_residual`` (the median over tasks of :func:`inner_residual`)
    and the seconds taken.
    """
    if num_tasks < 1 or batch < 1:
        raise ValueError(f"num_tasks={num_tasks} and batch={batch} must be ≥ 1")
    steps = cfg.inner_steps if inner_steps is None else inner_steps
    start = time.perf_counter()
    rank, size = world()
    implicit = get_method(cfg.method).implicit
    keys = (("loss", "acc") if is_classification(cfg) else ("loss",)) + (("inner_residual",) if implicit else ())
    values = torch.zeros(len(keys), num_tasks, dtype=torch.float64)  # this process's tasks, 0 elsewhere
    done = 0
    with tqdm(total=num_tasks, desc="evaluating", unit="task", disable=not progress or rank != 0,
              leave=False) as bar:
        while done < num_tasks:
            t = min(batch, num_tasks - done)
            sx, sy, qx, qy = sampler.sample(t)
            part = split_tasks(t, rank, size)
            if part.size:
                mine = part.tasks
                phi = adapt(cfg, model, sx[mine], sy[mine], steps)
                scores = task_scores(cfg, model, phi, qx[mine], qy[mine])
                if implicit:
                    scores["inner_residual"] = inner_residual(cfg, model, phi, sx[mine], sy[mine])
                for row, key in enumerate(keys):
                    values[row, done + part.start:done + part.stop] = scores[key].cpu().double()
            done += t
            bar.update(t)
    values = sum_over_ranks(values, next(model.parameters()).device)
    scores = dict(zip(keys, values))
    residual = scores.pop("inner_residual", None)
    result: Dict[str, Any] = {k: asdict(summarize(v)) for k, v in scores.items()}
    if residual is not None:
        result["inner_residual"] = float(residual.median())
    result.update(per_task={k: v.tolist() for k, v in scores.items()}, tasks=num_tasks, inner_steps=steps,
                  adaptation=adaptation_text(cfg, steps), seconds=time.perf_counter() - start)
    return result
