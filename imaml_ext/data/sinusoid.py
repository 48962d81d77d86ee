"""Sinusoid regression tasks (Finn, Abbeel & Levine, 2017).

A task is ``y = A · sin(x − φ)`` with amplitude A ~ U[0.1, 5], phase
φ ~ U[0, π]; its support and query inputs are drawn independently,
x ~ U[−5, 5].
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from .sampler import SeededSampler, TaskBatch

__all__ = ["SinusoidTasks", "sinusoid"]


def sinusoid(x: torch.Tensor, amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """``A · sin(x − φ)`` per task: x [T, n, 1], amplitude and phase [T] → [T, n, 1]."""
    return amplitude[:, None, None] * torch.sin(x - phase[:, None, None])


class SinusoidTasks(SeededSampler):
    """Draws sinusoid regression tasks.

    Args:
        shots: K, support points per task.
        queries: Q, query points per task.
        amplitude, phase, x_range: (low, high) of the uniform distributions.
        seed: seed of the sampler's generator (see :class:`SeededSampler`).
        device, dtype: of the returned tensors; draws are made in float64 on
            the CPU, so a seed gives the same tasks for every dtype and device.

    Example::

        tasks = SinusoidTasks(shots=10, queries=10, seed=0)
        sx, sy, qx, qy = tasks.sample(meta_batch=25)  # each [25, 10, 1]
    """

    def __init__(self, shots: int = 10, queries: int = 10, *,
                 amplitude: Tuple[float, float] = (0.1, 5.0),
                 phase: Tuple[float, float] = (0.0, math.pi),
                 x_range: Tuple[float, float] = (-5.0, 5.0), seed: int = 0,
                 device: Optional[Union[str, torch.device]] = None, dtype: torch.dtype = torch.float32):
        super().__init__(seed)
        if shots < 1 or queries < 0:
            raise ValueError(f"shots={shots}, queries={queries}: need shots ≥ 1, queries ≥ 0")
        for name, (low, high) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not low <= high:
                raise ValueError(f"{name}=({low}, {high}): low must not exceed high")
        self.shots, self.queries = shots, queries
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype

    def _uniform(self, shape: Tuple[int, ...], bounds: Tuple[float, float],
                 generator: torch.Generator) -> torch.Tensor:
        low, high = bounds
        return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)

    def sample_tasks(self, meta_batch: int, generator: Optional[torch.Generator] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Amplitude and phase of ``meta_batch`` tasks, each [T], float64 on the CPU."""
        if meta_batch < 1:
            raise ValueError(f"meta_batch={meta_batch}: need at least one task")
        g = self.generator if generator is None else generator
        return (self._uniform((meta_batch,), self.amplitude, g),
                self._uniform((meta_batch,), self.phase, g))

    def sample_points(self, amplitude: torch.Tensor, phase: torch.Tensor,
                      generator: Optional[torch.Generator] = None) -> TaskBatch:
        """Support and query points of the tasks ``(amplitude, phase)`` ([T] each):
        x and y [T, K, 1] and [T, Q, 1], ``dtype`` on ``device``."""
        g = self.generator if generator is None else generator
        t = amplitude.shape[0]
        sx = self._uniform((t, self.shots, 1), self.x_range, g)
        qx = self._uniform((t, self.queries, 1), self.x_range, g)
        out = [sx, sinusoid(sx, amplitude, phase), qx, sinusoid(qx, amplitude, phase)]
        return TaskBatch(*(v.to(self.device, self.dtype) for v in out))

    def sample(self, meta_batch: int, generator: Optional[torch.Generator] = None) -> TaskBatch:
        """``meta_batch`` new tasks with their points: x, y [T, K, 1] and [T, Q, 1]."""
        g = self.generator if generator is None else generator
        return self.sample_points(*self.sample_tasks(meta_batch, g), generator=g)
