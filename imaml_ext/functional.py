"""A user's ``nn.Module`` and loss as pure, task-batched functions of flat parameters.

:class:`TaskLoss` turns ``model`` and ``loss_fn(outputs, targets)`` into

* ``per_task(phi_t [P], x_t [n, ...], y_t [n, ...]) -> scalar``, a pure function
  in the sense of ``torch.func`` (what :mod:`imaml_ext.hvp` differentiates);
* ``outputs(phi [T, P], x [T, m, ...]) -> [T, m, ...]`` and
  ``losses(phi, x, y) -> [T]``, the same over all tasks, batched as
  ``batching`` says (:mod:`imaml_ext.batching`: ``vmap`` with per-task
  randomness, or a loop over tasks);
* ``grad(phi, x, y) -> ([T, P], [T])``, per-task gradients and losses
  (compiled with ``batching="compiled"``, :mod:`imaml_ext.compiled`).

Parameters that do not require grad and buffers are passed to the model as
constants shared by all tasks.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn
from torch.func import functional_call

from . import batching as _batching
from .batching import under_transform
from .compiled import GradFn, compiled_grad
from .cpu_malloc import reuse_freed_memory
from .flat import ParamLayout
from .fused_layers import follow_modes, fused_for, fusion_enabled, runs_channels_last

__all__ = ["TaskLoss", "check_module"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: What ``Tensor.view`` says of a tensor whose strides it cannot view: a forward
#: that assumes contiguous activations (TaskLoss then runs it without channels-last).
_CONTIGUOUS_VIEW_FAILURE = "view size is not compatible with input tensor's size and stride"
#: Models whose forward failed so: later TaskLosses of them run contiguous from the start.
_VIEWS_ACTIVATIONS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def check_module(model: nn.Module) -> None:
    """Reject models whose forward would update state under ``vmap``.

    Batch-norm layers with running statistics in training mode write to their
    buffers on every forward pass, which cannot be done for T tasks at once
    (and would mix the tasks' statistics).  MAML and iMAML use batch
    statistics: build such layers with ``track_running_stats=False``.
    """
    for name, mod in model.named_modules():
        if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.training \
                and getattr(mod, "track_running_stats", False) and mod.running_mean is not None:
            raise ValueError(
                f"layer '{name or type(mod).__name__}' ({type(mod).__name__}) keeps running "
                "statistics and updates them in training mode, which cannot be batched over "
                "tasks; construct it with track_running_stats=False (MAML/iMAML use batch "
                "statistics), or put the model in eval mode to use its stored statistics")


class TaskLoss:
    """``model`` + ``loss_fn`` as functions of a flat parameter vector per task."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batching: str = "vmap"):
        check_module(model)
        self.model = model
        self.loss_fn = loss_fn
        self.batching = batching  # "vmap" or "loop"; select_batching resolves "auto" and "compiled"
        self.compiled: Optional[GradFn] = None  # grad's compiled form (batching="compiled")
        self.layout = ParamLayout.from_module(model)
        if self.layout.numel == 0:
            raise ValueError("the model has no parameters that require grad: nothing to meta-learn")
        params = [p for p in model.parameters() if p.requires_grad]
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if any(not d.is_floating_point for d in dtypes):
            raise TypeError(f"parameters that require grad must be floating point, got {sorted(map(str, dtypes))}")
        if len(dtypes) > 1:
            raise TypeError(
                f"all trainable parameters must share one dtype to be packed into a flat "
                f"buffer, got {sorted(map(str, dtypes))}; call model.to(dtype) first")
        if len(devices) > 1:
            raise ValueError(f"all trainable parameters must be on one device, got {sorted(map(str, devices))}")
        self.dtype = params[0].dtype
        self.device = params[0].device
        if self.device.type == "cpu":
            reuse_freed_memory()
        # the module tree that runs: batch-norm, ReLU and max-pool fused (fused_layers)
        self.runner = fused_for(model, self.device)
        # its folded convolutions' activations channels-last where every layer after them takes that layout
        self.channels_last = runs_channels_last(self.runner) and model not in _VIEWS_ACTIVATIONS
        trainable = set(self.layout.names)
        self.constants: Dict[str, torch.Tensor] = {
            n: p for n, p in model.named_parameters() if n not in trainable}
        self.constants.update(dict(model.named_buffers()))

    def theta(self) -> torch.Tensor:
        """The model's trainable parameters as one ``[P]`` vector (differentiable)."""
        return self.layout.flatten(dict(self.model.named_parameters()))

    def _call(self, phi_t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        tensors = self.layout.unflatten(phi_t)
        tensors.update(self.constants)
        follow_modes(self.runner)
        if self.channels_last and fusion_enabled():
            rng = torch.get_rng_state()
            try:
                with _batching.CHANNELS_LAST.set(True):
                    out = functional_call(self.runner, tensors, (x_t,))
                # what leaves the model has the usual layout, for a loss that views it
                return out.contiguous() if out.dim() == 4 else out
            except RuntimeError as e:
                if _CONTIGUOUS_VIEW_FAILURE not in str(e):
                    raise
                # the forward views an activation as if it were contiguous: from now on it runs
                # contiguous (below), the random draws of the failed attempt undone
                self.channels_last = False
                _VIEWS_ACTIVATIONS.add(self.model)
                warnings.warn(
                    "imaml_ext: the model's forward calls .view on an activation that imaml_ext keeps "
                    f"channels-last on the CPU ({str(e).splitlines()[0]}); it now runs with contiguous "
                    "activations, which is slower for this model. Use .reshape or .flatten there instead "
                    "of .view to keep the faster layout.", RuntimeWarning, stacklevel=2)
                torch.set_rng_state(rng)
        return functional_call(self.runner, tensors, (x_t,))

    def per_task_outputs(self, phi_t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """One task's model outputs ``model_phi_t(x_t)``, a pure function of ``phi_t`` [P]."""
        return self._call(phi_t, x_t)

    def per_task(self, phi_t: torch.Tensor, x_t: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
        """Scalar loss of one task: ``loss_fn(model_phi_t(x_t), y_t)``."""
        loss = self.loss_fn(self._call(phi_t, x_t), y_t)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return one scalar per task, got shape {tuple(loss.shape)}; "
                             "use reduction='mean' (or 'sum')")
        return loss

    def select_batching(self, batching: str, x: torch.Tensor, y: torch.Tensor) -> Dict[str, object]:
        """Set how tasks are batched: ``"vmap"``, ``"loop"``, ``"compiled"`` (``"vmap"``
        with :meth:`grad` compiled, :mod:`imaml_ext.compiled`) or ``"auto"``, which
        calibrates on the support batch ``x``/``y`` ``[T, n, ...]`` at θ
        (:func:`imaml_ext.batching.choose`; inside a ``torch.func`` transform,
        where timing the transformed call says little, ``"auto"`` is ``"vmap"``).
        Returns the decision, ``{"batching": mode, "requested": batching, ...}``.
        """
        theta = self.theta()
        self.compiled = None
        if batching == "compiled":
            self.batching = "vmap"
            self.compiled = compiled_grad(self.model, self.loss_fn, self.layout, self._grad)
            return {"batching": batching, "requested": batching}
        if batching != "auto":
            decision: Dict[str, object] = {"batching": batching}
        elif under_transform(theta):
            decision = {"batching": "vmap", "reason": "inside a torch.func transform"}
        else:
            key = (repr(self.model), self.model.training, self.layout.shapes, tuple(x.shape),
                   tuple(y.shape), x.dtype, y.dtype, str(x.device), getattr(self.loss_fn, "__qualname__", None))
            with torch.no_grad():
                phi = theta.detach().unsqueeze(0).expand(x.shape[0], -1)
            decision = _batching.choose(self.per_task, key, phi, x, y)
        self.batching = str(decision["batching"])
        return dict(decision, requested=batching)

    def over_tasks(self, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``fn`` of one task's arguments, run over all tasks as ``self.batching`` says."""
        return _batching.over_tasks(fn, self.batching)

    def outputs(self, phi: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Model outputs for every task: phi [T, P], x [T, m, ...] -> [T, m, ...]."""
        return self.over_tasks(self._call)(phi, x)

    def losses(self, phi: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-task losses [T]."""
        return self.over_tasks(self.per_task)(phi, x, y)

    def grad(self, phi: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-task gradients ``[T, P]`` and losses ``[T]`` at ``phi`` (no graph kept).

        The tasks are independent, so the gradient of the summed loss with
        respect to ``phi`` holds each task's own gradient in its row.  Compiled
        where ``batching="compiled"`` (not inside a ``torch.func`` transform).
        """
        if self.compiled is not None and not (under_transform(phi) or under_transform(x)):
            return self.compiled(phi.detach(), self.constants, x, y)
        return self._grad(phi, x, y)

    def _grad(self, phi: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`grad` uncompiled, batched as ``self.batching`` says."""
        with torch.enable_grad():
            p = phi.detach().requires_grad_(True)
            losses = self.losses(p, x, y)
            (g,) = torch.autograd.grad(losses.sum(), p, allow_unused=True)
        if g is None:
            g = torch.zeros_like(phi)
        return g, losses.detach()
