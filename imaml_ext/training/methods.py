"""The meta-learning methods of the training application, in one table.

Each entry of :data:`METHODS` says, for one ``--method`` name:

* ``algorithm``: the library call that adapts a meta-batch at training
  time (:func:`imaml_ext.imaml` or :func:`imaml_ext.maml`), with the
  configuration fields it reads (``hyper``) and the options the method fixes
  (``options``, e.g. ``inner_solver="hf"`` or ``mode="checkpointed"``);
* ``reptile``: whether the meta-gradient is Reptile's θ − mean_t φ_t
  (:func:`imaml_ext.reptile_grad`, adapted without a graph) instead of the
  backward of the query loss;
* ``adaptation``: how a trained model adapts to a new task at evaluation
  time (:data:`ADAPTATIONS`): the regularised inner solve of training for
  iMAML, plain SGD steps with the inner learning rate for the MAML family.

Training (:class:`~imaml_ext.training.train.MetaStep`), evaluation
(:func:`~imaml_ext.training.evaluate.adapt`), the configuration's checks,
the CLI's choices and the presets all read this table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Tuple

import torch
from torch import nn

from ..adapted import Adapted
from ..functional import TaskLoss
from ..implicit import imaml
from ..inner import solve_gd, solve_hf
from ..unrolled import COMPILED_MODES, maml

if TYPE_CHECKING:  # pragma: no cover
    from .experiment import TrainConfig

__all__ = ["Method", "METHODS", "ADAPTATIONS", "get_method", "method_names", "implicit_method_names",
           "describe_adaptation"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Test-time adaptation: (cfg, task_loss, θ [P], support_x, support_y, steps) -> φ [T, P].
Adaptation = Callable[["TrainConfig", TaskLoss, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def _proximal_gd(cfg, task_loss, theta, x, y, steps):
    """Gradient descent on L̂(φ) + (λ/2)‖φ − θ‖² from θ (iMAML-GD's inner solve)."""
    return solve_gd(task_loss, theta, x, y, lam=cfg.lam, steps=steps, lr=cfg.inner_lr)


def _newton(cfg, task_loss, theta, x, y, steps):
    """Hessian-free Newton on the same objective (iMAML-HF's inner solve)."""
    return solve_hf(task_loss, theta, x, y, lam=cfg.lam, steps=steps, cg_steps=cfg.inner_cg_steps,
                    curvature=cfg.curvature)


def _sgd(cfg, task_loss, theta, x, y, steps):
    """Plain SGD steps on L̂ with the inner learning rate (λ = 0)."""
    return solve_gd(task_loss, theta, x, y, lam=0.0, steps=steps, lr=cfg.inner_lr)


ADAPTATIONS: Dict[str, Adaptation] = {"proximal-gd": _proximal_gd, "newton": _newton, "sgd": _sgd}

# What each adaptation does, for the output of evaluation (formatted with the config and steps).
_ADAPTATION_TEXT = {
    "proximal-gd": "{steps} GD steps of lr {cfg.inner_lr:g} on L̂(φ) + (λ/2)‖φ − θ‖², λ = {cfg.lam:g}, "
                   "from θ (iMAML-GD's inner solve)",
    "newton": "{steps} Hessian-free Newton steps ({cfg.inner_cg_steps} CG steps each, {cfg.curvature} "
              "curvature) on "
              "L̂(φ) + (λ/2)‖φ − θ‖², λ = {cfg.lam:g}, from θ (iMAML-HF's inner solve)",
    "sgd": "{steps} SGD steps of lr {cfg.inner_lr:g} on L̂ from θ",
}


def describe_adaptation(cfg: "TrainConfig", adaptation: str, steps: int) -> str:
    """One line saying how a model adapts at test time, e.g. ``'10 SGD steps of lr 0.01 on L̂ from θ'``."""
    return _ADAPTATION_TEXT[adaptation].format(cfg=cfg, steps=steps)

_IMAML_HYPER = ("lam", "inner_steps", "inner_lr", "cg_steps", "inner_cg_steps", "curvature")
_MAML_HYPER = ("inner_steps", "inner_lr")


@dataclass(frozen=True)
class Method:
    """One meta-learning method: its training-time algorithm and its test-time adaptation."""

    name: str
    algorithm: Callable[..., Adapted]
    hyper: Tuple[str, ...]
    options: Mapping[str, Any] = field(default_factory=dict)
    adaptation: str = "sgd"
    reptile: bool = False

    @property
    def implicit(self) -> bool:
        """Whether the meta-gradient is iMAML's implicit one (λ and the CG steps apply)."""
        return self.algorithm is imaml

    def check_batching(self, batching: str) -> None:
        """ValueError where this method cannot run its tasks as ``batching`` says: full MAML
        has no graph-free inner steps for ``"compiled"`` to compile."""
        mode = self.options.get("mode")
        if batching == "compiled" and mode is not None and mode not in COMPILED_MODES:
            raise ValueError(f"--batching compiled compiles the inner steps that keep no graph; method "
                             f"{self.name!r} (full MAML) differentiates through every step: use --batching vmap")

    def adapt(self, cfg: "TrainConfig", model: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor,
              loss_fn: LossFn, batching: str = "vmap") -> Adapted:
        """The training-time inner loop over a meta-batch (``[T, n, ...]`` support set),
        its tasks run as ``batching`` says (:mod:`imaml_ext.batching`)."""
        hyper = {name: getattr(cfg, name) for name in self.hyper}
        return self.algorithm(model, support_x, support_y, loss_fn, **hyper, **self.options, batching=batching)

    def adapt_for_test(self, cfg: "TrainConfig", task_loss: TaskLoss, theta: torch.Tensor,
                       support_x: torch.Tensor, support_y: torch.Tensor, steps: int) -> torch.Tensor:
        """Test-time adaptation from θ: each task's adapted parameters ``[T, P]``."""
        return ADAPTATIONS[self.adaptation](cfg, task_loss, theta, support_x, support_y, steps)


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("imaml-gd", imaml, _IMAML_HYPER, {"inner_solver": "gd"}, adaptation="proximal-gd"),
    Method("imaml-hf", imaml, _IMAML_HYPER, {"inner_solver": "hf"}, adaptation="newton"),
    Method("maml", maml, _MAML_HYPER, {"mode": "full"}),
    Method("fomaml", maml, _MAML_HYPER, {"mode": "first_order"}),
    Method("checkpointed-maml", maml, _MAML_HYPER, {"mode": "checkpointed"}),
    Method("reptile", maml, _MAML_HYPER, {"mode": "first_order"}, reptile=True),
)}


def method_names() -> Tuple[str, ...]:
    return tuple(METHODS)


def implicit_method_names() -> Tuple[str, ...]:
    return tuple(name for name, method in METHODS.items() if method.implicit)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method must be one of {method_names()}, got {name!r}") from None
