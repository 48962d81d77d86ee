"""Checks of user input shared by the meta-gradient entry points."""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .batching import BATCHING_MODES
from .functional import TaskLoss

__all__ = ["check_task_batch", "check_class_labels", "INNER_LR_RULE", "output_shape", "probe_forward",
           "IGNORE_INDEX", "real_number", "is_integer", "check_positive", "check_nonnegative", "check_steps", "optional_positive",
           "deprecated_alias", "check_batching"]


def check_task_batch(task_loss: TaskLoss, x: torch.Tensor, y: torch.Tensor, what: str = "support") -> None:
    """``x`` [T, n, ...] and ``y`` [T, n, ...]: task dimension first, same T ≥ 1 and
    n ≥ 1, on the model's device, finite; integer ``y`` (class labels) within
    the model's output width where it is known (:func:`check_class_labels`).

    The data checks read one small tensor back to the host, once per call."""
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
    if x.shape[0] == 0:
        raise ValueError(f"the meta-batch is empty: {what}_x has shape {tuple(x.shape)} (T = 0 tasks); "
                         f"pass at least one task")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{what}_x has {x.shape[1]} examples per task but {what}_y has {y.shape[1]}")
    if x.shape[1] == 0:
        raise ValueError(f"empty {what} set: {what}_x has shape {tuple(x.shape)} (n = 0 examples per task); "
                         f"each task needs at least one {what} example")
    # Everything data-dependent is gathered on the device and read back at once.
    checks = {f"{name} contains NaN or infinite values": ~torch.isfinite(t).all()
              for name, t in ((f"{what}_x", x), (f"{what}_y", y)) if t.is_floating_point()}
    label_range = _label_range(y)
    values = torch.stack([v.to(torch.int64) for v in (*checks.values(), *label_range)]).tolist() \
        if checks or label_range else []
    for problem, bad in zip(checks, values):
        if bad:
            raise ValueError(problem)
    if label_range:
        check_class_labels(task_loss, x, y, *values[len(checks):], what=what)


def _label_range(y: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """(min, max) of integer labels as 0-dim device tensors; () for other targets."""
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.numel() == 0:
        return ()
    return tuple(torch.aminmax(y))


IGNORE_INDEX = -100  # the label F.cross_entropy and F.nll_loss skip by default


def probe_forward(model: nn.Module, x_one: torch.Tensor) -> Optional[torch.Tensor]:
    """``model``'s output for one example ``x_one`` [1, ...]: no graph, and the
    random-number generators are left as they were (dropout draws from a
    forked state).  None when the model cannot run on one example (batch
    norm over a batch of one, say)."""
    devices = [x_one.device.index or 0] if x_one.device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            out = model(x_one)
    except Exception:  # noqa: BLE001 - any failure only means "not known from a probe"
        return None
    return out if isinstance(out, torch.Tensor) else None


# model -> {(example shape, dtype, device, parameter shapes): output shape for one example, or None}
_OUTPUT_SHAPES: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, Optional[torch.Size]]]" = weakref.WeakKeyDictionary()


def output_shape(task_loss: TaskLoss, x_t: torch.Tensor) -> Optional[torch.Size]:
    """The shape of the model's output for one example of one task's inputs
    ``x_t`` [n, ...], i.e. ``[1, ...]`` (:func:`probe_forward`, remembered per
    model, example shape and parameter shapes: a meta-step loop pays for it
    once); None when unknown."""
    model = task_loss.model
    key = (tuple(x_t.shape[1:]), x_t.dtype, x_t.device, tuple(tuple(p.shape) for p in model.parameters()))
    known = _OUTPUT_SHAPES.setdefault(model, {})
    if key not in known:
        out = probe_forward(model, x_t[:1])
        known[key] = None if out is None else out.shape
    return known[key]


def check_class_labels(task_loss: TaskLoss, x: torch.Tensor, y: torch.Tensor, low: int, high: int,
                       what: str = "support") -> None:
    """Integer labels ``y`` [T, n, ...] with values in [``low``, ``high``] must be
    class indices below the model's output width C when the model's one-task
    output is ``[n, C, ...]`` for labels ``[n, ...]`` (the layout of
    ``F.cross_entropy``); :data:`IGNORE_INDEX` is allowed.  Other layouts are
    not checked."""
    shape = output_shape(task_loss, x[0])  # [1, C, ...] for labels [n, ...]
    if shape is None or len(shape) != y.dim() or shape[0] != 1:
        return
    width = shape[1]
    if high >= width or (low < 0 and low != IGNORE_INDEX):
        bad = high if high >= width else low
        raise ValueError(
            f"{what}_y holds the label {bad}, but the model outputs {width} classes (labels 0..{width - 1}); "
            f"relabel each task's classes as 0..N-1, or build the model with as many outputs as classes")


def real_number(name: str, value: Any) -> float:
    """``value`` as a Python float if it is a real number: an int or float, a
    NumPy integer or floating scalar, or a 0-dim integer or floating tensor
    without grad (read once).  bool is not a number."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name} must be a real number; a tensor must be 0-dim integer or floating, "
                             f"got shape {tuple(value.shape)} and dtype {value.dtype}")
        if value.requires_grad:
            raise ValueError(f"{name} is not differentiated here; pass a number or {name}.detach()")
        return float(value.item())
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    return float(value)


# One rule for the inner step size of every method: a number > 0; "no adaptation" is inner_steps=0.
INNER_LR_RULE = "; for no adaptation pass inner_steps=0"


def check_positive(name: str, value: Any, hint: str = "") -> float:
    """``value`` as a float (:func:`real_number`) if it is finite and > 0, else a ValueError."""
    number = real_number(name, value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}{hint}")
    return number


def check_nonnegative(name: str, value: Any) -> float:
    """``value`` as a float (:func:`real_number`) if it is finite and ≥ 0, else a ValueError."""
    number = real_number(name, value)
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return number


def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer: an int, a NumPy integer, or a 0-dim integer tensor (not bool)."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_floating_point() and not value.is_complex() \
            and value.dtype != torch.bool
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_steps(name: str, value: Any, minimum: int = 0, hint: str = "") -> int:
    """``value`` as an int if it is an integer (:func:`is_integer`) ≥ ``minimum`` (0 or 1)."""
    if not is_integer(value) or int(value) < minimum:
        kind = "non-negative" if minimum == 0 else "positive"
        raise ValueError(f"{name} must be a {kind} integer, got {value!r}{hint}")
    return int(value)


def optional_positive(name: str, value: Any) -> Optional[float]:
    """A setting where None means "off": None, or a positive finite number.

    An explicit 0 (the spelling of "off" before None) still means off, with a
    DeprecationWarning; negative or non-finite values are errors.
    """
    if value is None:
        return None
    value = check_nonnegative(name, value)
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
                         "'compiled' is 'vmap' with the inner steps' gradients compiled by torch.compile, "
                         "'auto' measures 'vmap' and 'loop'")
