"""Data-parallel meta-training over tasks with ``torch.distributed``.

N processes (ranks) share one meta-batch of T tasks: every rank draws the
same T tasks, rank r adapts its slice of them (:func:`task_shard`), and the
meta-gradients are summed across ranks before the outer optimizer steps.

The meta-gradient of the mean query loss over T tasks is
``g = (1/T) Σ_t g_t``.  A rank with T_r tasks forms the gradient of its own
mean, ``g_r = (1/T_r) Σ_{t in r} g_t``, so ``g = Σ_r (T_r/T) · g_r``: each
rank weights its gradient by ``T_r/T`` (:attr:`TaskShard.weight`) and the
ranks sum.  T need not be divisible by N (the slices differ by at most one
task); every rank needs at least one task (T ≥ N).

:func:`all_reduce_meta_grad` does the sum with ONE collective: the
parameters' gradients travel as one flat buffer
(:class:`~imaml_ext.flat.ParamLayout`), with any per-step metrics appended
to it.  Example, inside a process group (``torchrun`` and
``torch.distributed.init_process_group``)::

    shard = im.distributed.task_shard(T)               # this rank's slice
    adapted = im.imaml(model, sx[shard.tasks], sy[shard.tasks], F.cross_entropy)
    loss = F.cross_entropy(adapted(qx[shard.tasks]).flatten(0, 1), qy[shard.tasks].flatten())
    opt.zero_grad(); loss.backward()
    mean_loss, = im.distributed.all_reduce_meta_grad(model, shard.weight, loss.detach())
    opt.step()                                          # the same update on every rank

Outside a process group (one process) the functions act on the whole
meta-batch; with ``WORLD_SIZE`` > 1 in the environment but no process
group they raise instead of silently training N independent models.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .flat import ParamLayout

__all__ = ["TaskShard", "split_tasks", "task_shard", "world", "all_reduce_sum", "all_reduce_meta_grad"]

# How long all_reduce_sum waits for gloo's worker thread to let go of a buffer (seconds).
_RELEASE_TIMEOUT = 10.0


def world(group: Optional["dist.ProcessGroup"] = None) -> Tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` without a process group.

    Raises RuntimeError when ``WORLD_SIZE`` > 1 (set by torchrun) but
    ``torch.distributed`` is not initialised.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size > 1:
        raise RuntimeError(
            f"WORLD_SIZE={size} but torch.distributed is not initialised: call "
            f"torch.distributed.init_process_group() first (imaml-ext train and eval do it under "
            f"torchrun), or unset WORLD_SIZE to run one process")
    return 0, 1


@dataclass(frozen=True)
class TaskShard:
    """Rank ``rank``'s share of a meta-batch of ``total`` tasks: tasks ``start:stop``.

    ``weight`` = (stop − start) / total: the factor that turns the gradient of
    this shard's mean loss into its part of the whole meta-batch's mean.
    """

    start: int
    stop: int
    total: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def tasks(self) -> slice:
        """Index of this shard in the task dimension (dim 0)."""
        return slice(self.start, self.stop)

    @property
    def weight(self) -> float:
        return self.size / self.total


def split_tasks(total: int, rank: int, world_size: int) -> TaskShard:
    """Contiguous near-equal slices: the first ``total % world_size`` ranks get one task more.

    A shard may be empty when ``total < world_size`` (:func:`task_shard` refuses that).
    """
    if total < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"split_tasks(total={total}, rank={rank}, world_size={world_size}): need "
                         f"total ≥ 0 and 0 ≤ rank < world_size")
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return TaskShard(start, start + base + (rank < extra), total)


def task_shard(total: int, group: Optional["dist.ProcessGroup"] = None) -> TaskShard:
    """This rank's slice of a meta-batch of ``total`` tasks (the whole batch in one process).

    Raises ValueError if ``total`` < the number of ranks: every rank needs a task.
    """
    rank, size = world(group)
    if total < size:
        raise ValueError(f"a meta-batch of {total} tasks cannot be split over {size} processes: "
                         f"every process needs at least one task (use a meta-batch ≥ {size}, or fewer "
                         f"processes)")
    return split_tasks(total, rank, size)


def all_reduce_sum(buffer: torch.Tensor, group: Optional["dist.ProcessGroup"] = None) -> torch.Tensor:
    """Sum ``buffer`` over the ranks in place (``dist.all_reduce``); returns ``buffer``.

    For a CPU tensor (gloo) it returns only once the backend's worker thread
    has dropped its references to ``buffer``.  gloo marks a collective done
    a moment before its worker releases the tensors, and that release takes
    the GIL: when it comes after the interpreter began to shut down (the last
    collective of a run, on a rank with nothing left to do), the process
    aborts with "terminate called without an active exception" at exit.
    Waiting here (at most ``_RELEASE_TIMEOUT`` s, normally microseconds;
    by ``Tensor._use_count``, where torch has it) makes every collective end
    before the caller goes on.
    """
    use_count = getattr(buffer, "_use_count", None) if buffer.device.type == "cpu" else None
    held = use_count() if use_count else 0
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    if use_count:
        deadline = time.monotonic() + _RELEASE_TIMEOUT
        while use_count() > held and time.monotonic() < deadline:
            time.sleep(1e-5)
    return buffer


def all_reduce_meta_grad(model: nn.Module, weight: Optional[float] = None, *metrics: torch.Tensor,
                         group: Optional["dist.ProcessGroup"] = None) -> Tuple[torch.Tensor, ...]:
    """Replace each trainable parameter's ``.grad`` by Σ_ranks weight · grad, in one collective.

    Args:
        model: its parameters that require grad (a missing ``.grad`` counts as zeros).
        weight: this rank's factor, e.g. :attr:`TaskShard.weight` for the mean
            over all tasks; None: 1 / world_size (the mean over ranks).
        metrics: 0-dim tensors (e.g. this rank's mean loss) reduced in the same
            call, with the same weight.
        group: process group (default: the world).

    Returns:
        the reduced metrics (0-dim, on the gradients' device), in order.

    The gradients and metrics are packed into one ``[P + len(metrics)]``
    buffer of the parameters' dtype, summed with one ``all_reduce`` and
    copied back.  Without a process group only the weight is applied.
    """
    _, size = world(group)
    weight = 1.0 / size if weight is None else float(weight)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameters that require grad")
    layout = ParamLayout.from_named((str(i), p) for i, p in enumerate(params))
    grads = {str(i): p.grad if p.grad is not None else torch.zeros_like(p) for i, p in enumerate(params)}
    like = params[0]
    pieces = [layout.flatten(grads).detach().to(like.dtype)]
    pieces += [torch.as_tensor(m, dtype=like.dtype, device=like.device).detach().reshape(1) for m in metrics]
    buffer = torch.cat(pieces).mul_(weight)
    if size > 1:
        all_reduce_sum(buffer, group)
    flat, reduced = buffer[:layout.numel], buffer[layout.numel:]
    for p, g in zip(params, layout.split(flat)):
        p.grad = g.view_as(p).clone() if p.grad is None else p.grad.copy_(g.view_as(p))
    return tuple(reduced.unbind(0))
