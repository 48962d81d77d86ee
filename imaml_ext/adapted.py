"""The result of adaptation: T task-specific parameter sets and the model to run them."""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional

import torch

from .batching import under_transform
from .functional import TaskLoss

__all__ = ["Adapted", "task_chunks"]


def task_chunks(num_tasks: int, task_chunk: Optional[int]) -> List[slice]:
    """The tasks 0..T-1 in slices of ``task_chunk`` (one slice for None)."""
    size = num_tasks if task_chunk is None else task_chunk
    return [slice(i, min(i + size, num_tasks)) for i in range(0, num_tasks, size)]


class Adapted:
    """Adapted parameters of T tasks.

    ``adapted(x)`` runs the model with task t's parameters on ``x[t]``
    (x ``[T, m, ...]`` -> ``[T, m, ...]``); ``flat`` is the ``[T, P]`` buffer
    (carrying the meta-gradient's autograd graph) and ``params`` its named
    ``[T, ...]`` views.  With ``task_chunk``, ``adapted(x)`` and ``loss`` run the
    tasks that many at a time and recompute each chunk's forward pass in the
    backward pass, each chunk's backward solve right after it (peak memory of
    one chunk besides φ* itself; under a ``torch.func`` transform the chunks
    keep their activations and share one backward solve).  Each such call and
    ``flat`` / ``params`` are then solved as separate systems, whose sum equals
    one solve of the summed gradient where the linear solver is linear in its
    right-hand side (CG run to convergence, Neumann), not with truncated CG.

    ``info`` holds solver diagnostics, per task.  From :func:`~imaml_ext.imaml`
    (keys and shapes also in :data:`imaml_ext.diagnostics.INFO_FIELDS`):

    * after the forward: ``"residual"`` ``[T]``, the relative stationarity
      residual ‖∇L̂(φ) + λ(φ − θ)‖/‖∇L̂(θ)‖ of the inner problem at the last
      iterate whose gradient the inner solver evaluated (for GD and HF the
      iterate before the last step; :mod:`imaml_ext.inner`);
      ``"residual_norm"`` ``[T]`` the same, absolute; ``"residual_at_theta"``
      ``[T]`` its value at θ; ``"inner_steps_taken"`` ``[T]`` int64;
    * after the backward: ``"linear_solve"`` (the linear solver's result),
      ``"cg"`` (:class:`~imaml_ext.solvers.CGResult`: ``x`` ``[T, P]``, None with
      ``task_chunk`` where adapted(x) / loss ran the backward chunk by chunk,
      ``iterations``, ``state``, ``residual_sq``, ``min_curvature``, each
      ``[T]``), ``"nonpositive_curvature"`` ``[T]`` bool (CG met pᵀAp ≤ 0),
      ``"min_rayleigh"`` ``[T]`` (smallest pᵀAp/pᵀp CG met, an upper bound
      on the smallest eigenvalue of A = I + H/λ).

    From :func:`~imaml_ext.maml`: ``"inner_losses"`` ``[K, T]`` and the
    inner solver's name.
    """

    def __init__(self, task_loss: TaskLoss, flat: torch.Tensor, info: Dict[str, object],
                 task_chunk: Optional[int] = None,
                 streamed: Optional[Callable[[], Callable[[int], torch.Tensor]]] = None):
        self.task_loss = task_loss
        self.flat = flat
        self.info = info
        self.task_chunk = task_chunk
        # with chunks: a fresh source of per-chunk parameters (chunk index -> [t, P]) whose
        # backward solves each chunk on its own (imaml_ext.implicit._StreamedChunks); None:
        # the chunks of flat
        self._streamed = streamed

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
        return self._chunked(self.task_loss.outputs, x)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-task losses ``[T]`` of the adapted parameters on (x, y)."""
        return self._chunked(self.task_loss.losses, x, y)

    def _chunked(self, fn, *data: torch.Tensor) -> torch.Tensor:
        """``fn(flat, *data)``; with ``task_chunk``, ``task_chunk`` tasks at a time, each
        chunk's activations recomputed in the backward pass instead of kept, and (from
        :func:`~imaml_ext.imaml`) each chunk's backward solve run right after it."""
        chunks = task_chunks(self.num_tasks, self.task_chunk)
        if len(chunks) == 1:
            return fn(self.flat, *data)
        # split, not indexing: one backward node writes the chunks' gradients into one [T, P]
        # buffer, where a slice's backward would fill a zero [T, P] buffer per chunk.
        sizes = [c.stop - c.start for c in chunks]
        if _functorch_active() or any(under_transform(t) for t in (self.flat, *data)):
            # torch.func transforms take no recomputing autograd.Function: the chunks run as they are
            return torch.cat([fn(flat, *(d[c] for d in data))
                              for flat, c in zip(self.flat.split(sizes), chunks)])
        if self._streamed is not None and torch.is_grad_enabled() and self.flat.requires_grad:
            chunk_flat = self._streamed()
            flats = (chunk_flat(i) for i in range(len(chunks)))  # made one by one, before each chunk's forward
        else:
            flats = iter(self.flat.split(sizes))
        return torch.cat([_Recomputed.apply(fn, flat, *(d[c] for d in data)) for flat, c in zip(flats, chunks)])

    def __repr__(self) -> str:
        return f"Adapted(tasks={self.num_tasks}, params={self.flat.shape[1]}, dtype={self.flat.dtype})"


def _rng_state(device: torch.device) -> tuple:
    """The random-number state a forward pass on ``device`` draws from: the CPU
    generator's, and ``device``'s own where it is an accelerator."""
    if device.type == "cpu":
        return (torch.get_rng_state(), None)
    return (torch.get_rng_state(), torch.get_device_module(device.type).get_rng_state(device))


def _functorch_active() -> bool:
    """A ``torch.func`` transform is being computed (even if no tensor here is wrapped)."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active is not None and active())


def _autocast_state(device: torch.device) -> List[tuple]:
    """(device type, ``torch.amp.autocast`` arguments) of the autocast now in force for
    the CPU and for ``device``'s type."""
    types = ["cpu"] + ([device.type] if device.type != "cpu" and torch.amp.is_autocast_available(device.type)
                       else [])
    return [(t, dict(enabled=torch.is_autocast_enabled(t), dtype=torch.get_autocast_dtype(t),
                     cache_enabled=torch.is_autocast_cache_enabled())) for t in types]


class _Recomputed(torch.autograd.Function):
    """``fn(flat, *data)`` that keeps no activations: the backward pass runs ``fn``
    again from the same random-number state (so dropout draws the same masks) and
    autocast state, and differentiates that, with ``create_graph`` too.  Unlike
    ``torch.utils.checkpoint``, it does not import ``torch._dynamo`` on its
    first call (1.3 s and about 150 MB resident, benchmarks/RESULTS.md)."""

    @staticmethod
    def forward(ctx, fn: Callable[..., torch.Tensor], flat: torch.Tensor, *data: torch.Tensor):
        ctx.fn, ctx.rng, ctx.autocast = fn, _rng_state(flat.device), _autocast_state(flat.device)
        ctx.save_for_backward(flat, *data)
        with torch.no_grad():
            return fn(flat, *data)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved = ctx.saved_tensors
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[1:]) if need]
        create_graph = torch.is_grad_enabled()  # a backward pass runs with grad mode on iff create_graph
        device = saved[0].device
        accelerators = [] if device.type == "cpu" else [device]
        with torch.random.fork_rng(devices=accelerators, device_type=device.type), torch.enable_grad():
            torch.set_rng_state(ctx.rng[0])
            if ctx.rng[1] is not None:
                torch.get_device_module(device.type).set_rng_state(ctx.rng[1], device)
            # Under create_graph the saved inputs keep their history, so the gradients
            # are differentiable through the recomputation; otherwise fresh leaves.
            inputs = [t if create_graph else (t.detach().requires_grad_(i in wanted)
                                              if t.is_floating_point() or t.is_complex() else t)
                      for i, t in enumerate(saved)]
            with contextlib.ExitStack() as autocast:  # the forward's, around the forward only
                for device_type, kwargs in ctx.autocast:
                    autocast.enter_context(torch.amp.autocast(device_type, **kwargs))
                out = ctx.fn(*inputs)
            grads = torch.autograd.grad(out, [inputs[i] for i in wanted], grad, create_graph=create_graph,
                                        allow_unused=True)
        result = [None] * len(saved)
        for i, g in zip(wanted, grads):
            result[i] = g
        return (None, *result)
