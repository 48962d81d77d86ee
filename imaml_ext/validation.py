"""Checks of user input shared by the meta-gradient entry points."""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from .batching import BATCHING_MODES
from .functional import TaskLoss

__all__ = ["check_task_batch", "check_positive", "check_nonnegative", "check_steps", "optional_positive",
           "deprecated_alias", "check_batching"]


def check_task_batch(task_loss: TaskLoss, x: torch.Tensor, y: torch.Tensor, what: str = "support") -> None:
    """``x`` [T, n, ...] and ``y`` [T, n, ...]: task dimension first, same T and n,
    on the model's device, finite."""
    for name, t in ((f"{what}_x", x), (f"{what}_y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(
                f"{name} must have the task dimension first, [T, n, ...], got shape {tuple(t.shape)}; "
                f"for a single task use {name}.unsqueeze(0)")
        if t.device != task_loss.device:
            raise ValueError(f"{name} is on {t.device} but the model is on {task_loss.device}; move one of them")
        if t.is_floating_point() and t.dtype != task_loss.dtype:
            raise TypeError(f"{name} is {t.dtype} but the model's parameters are {task_loss.dtype}; "
                            f"use {name}.to({task_loss.dtype}) or convert the model")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{what}_x has {x.shape[0]} tasks but {what}_y has {y.shape[0]}; "
                         "both need the same task dimension T first")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{what}_x has {x.shape[1]} examples per task but {what}_y has {y.shape[1]}")
    for name, t in ((f"{what}_x", x), (f"{what}_y", y)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or infinite values")


def check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def check_nonnegative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")


def check_steps(name: str, value: int, minimum: int = 0) -> None:
    """``value`` is an integer ≥ ``minimum`` (0 or 1)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "non-negative" if minimum == 0 else "positive"
        raise ValueError(f"{name} must be a {kind} integer, got {value!r}")


def optional_positive(name: str, value: Optional[float]) -> Optional[float]:
    """A setting where None means "off": None, or a positive finite number.

    An explicit 0 (the spelling of "off" before None) still means off, with a
    DeprecationWarning; negative or non-finite values are errors.
    """
    if value is None:
        return None
    check_nonnegative(name, value)
    if value == 0:
        warnings.warn(f"{name}=0 for 'off' is deprecated; pass {name}=None (the default)",
                      DeprecationWarning, stacklevel=3)
        return None
    return value


def deprecated_alias(new: str, new_value, old: str, old_value, default):
    """The value of a renamed argument: ``new_value`` if given, else ``old_value``
    (with a DeprecationWarning), else ``default``; giving both is an error."""
    if old_value is None:
        return default if new_value is None else new_value
    if new_value is not None:
        raise ValueError(f"{old}= is the old name of {new}=; pass only {new}=")
    warnings.warn(f"{old}= is deprecated; use {new}= (same values)", DeprecationWarning, stacklevel=3)
    return old_value


def check_batching(value: str) -> None:
    """``batching`` is one of :data:`imaml_ext.batching.BATCHING_MODES`."""
    if not isinstance(value, str) or value not in BATCHING_MODES:
        raise ValueError(f"batching must be one of {BATCHING_MODES}, got {value!r}: 'vmap' batches the "
                         "tasks with torch.func.vmap, 'loop' runs them one at a time (any module), "
                         "'auto' measures both")
