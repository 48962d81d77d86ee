"""How a per-task function is run over the T tasks of a meta-batch.

``batching`` (an argument of :func:`imaml_ext.imaml` and :func:`imaml_ext.maml`):

* ``"vmap"``: ``torch.func.vmap`` with ``randomness="different"`` — one
  batched call for all tasks; random layers (dropout) draw independent
  values for every task.  Fast where PyTorch has batching rules for the
  model's operators; a model it cannot batch (an LSTM, data-dependent
  Python control flow, ``.item()``) raises :class:`BatchingError`.
* ``"loop"``: a Python loop over the tasks, one ordinary call each, results
  stacked.  Runs any module that runs on one task; slower for small models.
* ``"auto"``: :func:`choose` measures one gradient of the support loss both
  ways (and takes ``"loop"`` if vmap cannot batch the model), remembers the
  faster per architecture and input shape, and reports the decision.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Tuple

import torch
from torch.func import vmap

__all__ = ["BATCHING_MODES", "BatchingError", "over_tasks", "choose"]

BATCHING_MODES = ("vmap", "loop", "auto")
_VMAP_FAILURE_MARKS = ("vmap", "batching rule", "batched tensor", "functorch")


class BatchingError(RuntimeError):
    """The model cannot be run under ``torch.func.vmap``; ``batching="loop"`` runs it."""


def is_vmap_failure(error: BaseException) -> bool:
    """True if ``error`` is PyTorch refusing to batch an operation under vmap."""
    message = str(error).lower()
    return isinstance(error, RuntimeError) and any(mark in message for mark in _VMAP_FAILURE_MARKS)


def _vmapped(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    batched = vmap(fn, randomness="different")

    def run(*args: torch.Tensor) -> torch.Tensor:
        try:
            return batched(*args)
        except BatchingError:
            raise
        except RuntimeError as e:
            if not is_vmap_failure(e):
                raise
            raise BatchingError(
                "the model cannot be batched over tasks with torch.func.vmap (batching='vmap'): "
                f"{str(e).splitlines()[0].rstrip('. ')}. Modules that vmap cannot batch include recurrent "
                "layers (nn.LSTM, nn.GRU, nn.RNN), Python control flow that depends on tensor "
                "values, and .item(); pass batching='loop' to run the tasks one at a time "
                "(same results, slower)") from e

    return run


def _looped(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(*args: torch.Tensor) -> torch.Tensor:
        # unbind: one autograd node per argument, not T indexing nodes that
        # would each scatter a gradient into a full [T, ...] tensor.
        return torch.stack([fn(*task) for task in zip(*(a.unbind(0) for a in args))])

    return run


def over_tasks(fn: Callable[..., torch.Tensor], batching: str) -> Callable[..., torch.Tensor]:
    """``fn(a_t, b_t, ...) -> tensor`` of one task, as a function of ``[T, ...]``
    arguments returning the stacked ``[T, ...]`` results (``batching`` is
    ``"vmap"`` or ``"loop"``)."""
    if batching == "vmap":
        return _vmapped(fn)
    if batching == "loop":
        return _looped(fn)
    raise ValueError(f"batching must be 'vmap' or 'loop' here, got {batching!r}")


# "auto"'s decisions: key (architecture, shapes, dtype, device, threads) -> info dict.
_DECISIONS: Dict[Tuple, Dict[str, object]] = {}
_CALIBRATION_REPEATS = 2


def _seconds_per_gradient(per_task, batching: str, phi, x, y) -> float:
    losses = over_tasks(per_task, batching)
    best = float("inf")
    for _ in range(1 + _CALIBRATION_REPEATS):  # the first call warms up
        if phi.is_cuda:
            torch.cuda.synchronize(phi.device)
        start = time.perf_counter()
        with torch.enable_grad():
            p = phi.detach().requires_grad_(True)
            torch.autograd.grad(losses(p, x, y).sum(), p, allow_unused=True)
        if phi.is_cuda:
            torch.cuda.synchronize(phi.device)
        best = min(best, time.perf_counter() - start)
    return best


def choose(per_task, key: Tuple, phi: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> Dict[str, object]:
    """``"auto"``: the faster of ``"vmap"`` and ``"loop"`` for one gradient of
    the summed per-task loss at ``phi`` ``[T, P]`` on ``x``/``y`` ``[T, n, ...]``
    (best of 2 after a warm-up), ``"loop"`` if vmap cannot batch the model.
    Decided once per ``key`` (the caller's architecture, shapes, dtype, device)
    and thread count.  Returns ``{"batching", "reason", "seconds"}``.
    """
    key = key + (torch.get_num_threads(),)
    if key in _DECISIONS:
        return dict(_DECISIONS[key], cached=True)
    try:
        vmap_s = _seconds_per_gradient(per_task, "vmap", phi, x, y)
    except BatchingError as e:
        decision = {"batching": "loop", "reason": f"vmap cannot batch the model: {e.__cause__}",
                    "seconds": {}}
    else:
        loop_s = _seconds_per_gradient(per_task, "loop", phi, x, y)
        mode = "vmap" if vmap_s <= loop_s else "loop"
        decision = {"batching": mode, "reason": "faster support-loss gradient in calibration",
                    "seconds": {"vmap": vmap_s, "loop": loop_s}}
    _DECISIONS[key] = decision
    return dict(decision, cached=False)
