"""The outer step's guard against a non-finite meta-gradient, without a host sync per step.

:func:`step_if_finite` steps the outer optimizer only where every entry of
the meta-gradient is finite: the decision is a 0-dim bool tensor on the
device, and a refused step leaves the parameters exactly as they were (the
optimizer sees a zero gradient, and the parameters are put back).  The
library itself returns NaN for a task with NaN data; this is where the
training stops it from reaching the model.

:class:`MetaGradientWatch` keeps each step's flag and per-task query losses
on the device; :meth:`MetaGradientWatch.check`, called where the training
loop reads the host anyway (a metrics line, a checkpoint), raises
:class:`NonFiniteStepError` naming the first refused step and the
tasks of its meta-batch whose query loss is not finite.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from .runfolder import RunError

__all__ = ["NonFiniteStepError", "step_if_finite", "MetaGradientWatch"]


class NonFiniteStepError(RunError):
    """A meta-step met NaN or infinite values: in its meta-gradient (the step was not applied)
    or, raised by the training loop, in an inner loop's support loss."""


def step_if_finite(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """``optimizer.step()`` if all gradients of its parameters are finite, else leave the
    parameters unchanged; returns that condition as a 0-dim bool tensor (no host sync).

    On a refused step the optimizer steps with a zero gradient (its moments
    decay, its step count advances) and the parameters are then restored, so
    no NaN or infinity enters the parameters or the optimizer state.
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not params:
        optimizer.step()
        return torch.ones((), dtype=torch.bool)
    ok = torch.stack([p.grad.isfinite().all() for p in params]).all()
    with torch.no_grad():
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad.masked_fill_(~ok, 0.0)
    optimizer.step()
    with torch.no_grad():
        for p, old in zip(params, before):
            p.copy_(torch.where(ok, p, old))
    return ok


class MetaGradientWatch:
    """Each step's finiteness flag and per-task query losses ``[T]``, kept on the device until :meth:`check`."""

    def __init__(self):
        self._pending: List[Tuple[int, torch.Tensor, torch.Tensor]] = []

    def record(self, step: int, finite: torch.Tensor, task_losses: torch.Tensor) -> None:
        self._pending.append((step, finite, task_losses))

    def check(self) -> None:
        """One host read of the flags recorded since the last check; raise
        :class:`NonFiniteStepError` for the first refused step."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        flags = torch.stack([finite for _, finite, _ in pending]).cpu()
        if bool(flags.all()):
            return
        step, _, losses = pending[int((~flags).nonzero()[0])]
        tasks = (~torch.isfinite(losses)).nonzero().flatten().tolist()
        if tasks:
            why = (f"task(s) {tasks} of its meta-batch (0-based) have a non-finite query loss: check the "
                   f"data (NaN or infinite inputs or targets) and the loss")
        else:
            why = ("every task's query loss is finite, so the meta-gradient itself overflowed: lower the "
                   "outer or inner learning rate")
        raise NonFiniteStepError(
            f"meta-step {step}: the meta-gradient has NaN or infinite entries and was not applied; {why}")
