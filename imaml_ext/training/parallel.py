"""The training application on several processes (``torchrun``): data parallel over tasks.

``torchrun --standalone --nproc-per-node N -m imaml_ext train ...`` starts N
ranks; :func:`process_group` joins them (gloo on CPU, NCCL on CUDA with one
GPU per rank, ``cuda:LOCAL_RANK``).  Every rank draws the same meta-batch of
T tasks from the same sampler state and adapts its slice
(:func:`imaml_ext.distributed.task_shard`); :class:`GradientSync` sums the
weighted meta-gradients, the loss / accuracy and the stop flag of a signal
in ONE ``all_reduce`` per meta-step, so every rank takes the same outer step
and stops after the same step.  Rank 0 alone writes the run folder
(metrics, checkpoints, config) and shows the progress bar; on ``--resume``
every rank reads the checkpoint (multi-node: the run folder must be on a
shared file system).  Evaluation splits each batch of test tasks the same
way and sums the per-task scores into one vector (:func:`sum_over_ranks`).
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import all_reduce_meta_grad, all_reduce_sum, task_shard, world
from .metrics import MetricsLogger

__all__ = ["Ranks", "process_group", "rank_device", "cuda_device_for", "GradientSync", "SilentMetricsLogger",
           "sum_over_ranks", "is_main"]


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``size``, and the device it computes on."""

    rank: int
    size: int
    device: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0


def is_main() -> bool:
    """Whether this process is rank 0 (or the only process)."""
    return world()[0] == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def cuda_device_for(local_rank: int, local_world_size: int, device_count: int) -> str:
    """``cuda:LOCAL_RANK``, or a ValueError when this node runs more ranks than it has GPUs."""
    if local_world_size > device_count:
        raise ValueError(f"{local_world_size} processes on this node but only {device_count} CUDA "
                         f"device(s): one GPU per process; use --nproc-per-node {device_count} or less, "
                         f"or --device cpu")
    return f"cuda:{local_rank}"


def rank_device(device: str) -> str:
    """The device of this process under torchrun: CPU as given; CUDA ``cuda:LOCAL_RANK``
    (a ValueError for another index, or more processes on the node than GPUs).
    ``device`` itself in one process."""
    parsed = torch.device(device)
    if _env_int("WORLD_SIZE", 1) <= 1 or parsed.type != "cuda":
        return device
    local_rank = _env_int("LOCAL_RANK", 0)
    if parsed.index is not None and parsed.index != local_rank:
        raise ValueError(f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK "
                         f"(here cuda:{local_rank}); pass --device cuda")
    return cuda_device_for(local_rank, _env_int("LOCAL_WORLD_SIZE", _env_int("WORLD_SIZE", 1)),
                           torch.cuda.device_count())


@contextlib.contextmanager
def process_group(device: str) -> Iterator[Ranks]:
    """Join the job torchrun started (``WORLD_SIZE`` > 1), and leave it at the end.

    ``device``: this process's, from :func:`rank_device`; CUDA uses NCCL, the
    CPU gloo.  Yields this process's :class:`Ranks` (one process: rank 0 of 1).  An exception on a rank of several is reported on stderr
    with the rank's number before it propagates: that rank exits non-zero,
    torchrun stops the others, and their pending collectives fail instead of
    waiting.  A process group that is already initialised is used as it is.
    """
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1 or dist.is_initialized():
        rank, size = world()
        yield Ranks(rank, size, device)
        return
    rank = _env_int("RANK", 0)
    try:
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(torch.device(device))
            dist.init_process_group("nccl", device_id=torch.device(device))
        else:
            dist.init_process_group("gloo")
        yield Ranks(rank, size, device)
    except BaseException as exc:
        if not isinstance(exc, (SystemExit, KeyboardInterrupt)):
            print(f"imaml-ext: rank {rank} of {size} failed: {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class GradientSync:
    """Runs a meta-step's gradient on this rank's slice of the meta-batch and sums it over the ranks.

    ``stop_pending()`` says whether a signal asked this rank to stop; it
    travels in the same all-reduce as the gradient, and :attr:`stop` is then
    true on every rank if it was on any, so all ranks stop after the same step.
    """

    def __init__(self, meta_batch: int, stop_pending: Callable[[], bool] = lambda: False):
        self.shard = task_shard(meta_batch)
        self.stop_pending = stop_pending
        self.stop = False

    def __call__(self, gradient: Callable, batch: Tuple[torch.Tensor, ...], model: nn.Module
                 ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``gradient(local batch) -> (loss, acc or None)`` on this rank's tasks; returns the
        meta-batch's mean loss and accuracy, with the parameters' ``.grad`` the meta-batch's."""
        if len(batch[0]) != self.shard.total:
            raise ValueError(f"a meta-batch of {len(batch[0])} tasks, expected {self.shard.total}")
        loss, acc = gradient(tuple(part[self.shard.tasks] for part in batch))
        stop = torch.tensor(float(self.stop_pending()))
        loss, total_acc, stop = all_reduce_meta_grad(model, self.shard.weight, loss,
                                                     acc if acc is not None else torch.zeros(()), stop)
        self.stop = bool(stop > 0)
        return loss, (total_acc if acc is not None else None)


class SilentMetricsLogger(MetricsLogger):
    """A :class:`MetricsLogger` that averages and returns records but writes no file (ranks > 0)."""

    def resume_at(self, step: Optional[int]) -> None:
        pass

    def __enter__(self) -> "SilentMetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def write(self, record):
        return record


def sum_over_ranks(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Σ over the ranks of ``values`` (reduced on ``device``, returned where it was);
    ``values`` itself in one process."""
    if world()[1] == 1:
        return values
    return all_reduce_sum(values.to(device)).to(values.device)
