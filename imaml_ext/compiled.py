"""``batching="compiled"``: the graph-free per-task gradients compiled by ``torch.compile``.

The inner steps of iMAML and of first-order and checkpointed MAML need, at
every step, each task's support gradient and loss and no graph
(:meth:`imaml_ext.functional.TaskLoss.grad`).  Compiled, that is
``vmap(grad_and_value(loss))`` of the user's model as written (not the
kernels of :mod:`imaml_ext.fused_layers`: inductor fuses batch-norm, ReLU and
pooling itself), over ``phi [T, P]``, the model's constants (buffers, frozen
parameters), ``x [T, n, ...]`` and ``y [T, n, ...]``.

Compiling takes tens of seconds on a CPU, once per model, input shape and
dtype: torch.compile keeps the compiled code for the function and re-checks
its guards at every call, so the meta-batches after the first reuse it.  The
function holds the model through a weak reference, so the compiled code does
not keep a deleted model alive.  Everything else (the query pass, the
Hessian-vector products, full MAML's differentiable steps) runs as
``"vmap"``.  ``torch._dynamo`` is imported where ``"compiled"`` is selected,
never on the other paths.

torch.compile keeps at most ``torch._dynamo.config.recompile_limit`` graphs
(8 by default) of this one function per process, for all models, shapes and
dtypes together; past it a call runs the eager gradient instead (the same
numbers, with a warning that says how to raise the limit).
"""
from __future__ import annotations

import warnings
import weakref
from typing import Callable, Dict, Tuple

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from .flat import ParamLayout

__all__ = ["CompileError", "compiled_grad"]

GradFn = Callable[[torch.Tensor, Dict[str, torch.Tensor], torch.Tensor, torch.Tensor],
                  Tuple[torch.Tensor, torch.Tensor]]


class CompileError(RuntimeError):
    """torch.compile could not compile a model's per-task gradient (``batching="compiled"``)."""


def compiled_grad(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  layout: ParamLayout, eager: Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                                       Tuple[torch.Tensor, torch.Tensor]]) -> GradFn:
    """``(phi [T, P], constants, x [T, n, ...], y [T, n, ...]) -> (∇L̂_t(φ_t) [T, P], L̂_t(φ_t) [T])``,
    compiled (``fullgraph=True``: a model that torch.compile cannot trace whole
    raises :class:`CompileError` at the first call instead of running eager
    pieces; one graph per input shape), with no graph kept.  ``eager(phi, x, y)``
    is the same gradient uncompiled: what runs past the recompile limit, and
    what a failed compilation runs once so that an error of the model or loss
    itself is raised as it is without compiling."""
    ref = weakref.ref(model)

    def loss(phi_t, constants, x_t, y_t):
        tensors = layout.unflatten(phi_t)
        tensors.update(constants)
        return loss_fn(functional_call(ref(), tensors, (x_t,)), y_t)

    # dynamic=False: one specialised graph per shape.  A second shape would
    # otherwise recompile with symbolic sizes, under which vmap's dropout fails.
    compiled = torch.compile(vmap(grad_and_value(loss), in_dims=(0, None, 0, 0), randomness="different"),
                             fullgraph=True, dynamic=False)

    def run(phi, constants, x, y):
        from torch._dynamo import config, exc
        # older torch names them FailOnCacheLimitHit and cache_size_limit
        limit_hit = getattr(exc, "FailOnRecompileLimitHit", None) or getattr(exc, "FailOnCacheLimitHit")
        limit_name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        try:
            with torch.no_grad():
                return compiled(phi, constants, x, y)
        except limit_hit:
            warnings.warn(
                f"batching='compiled': torch.compile holds its limit of {getattr(config, limit_name)} "
                "compiled per-task gradients in this process (one per model, input shape and dtype); this "
                f"one runs uncompiled (same results). Raise torch._dynamo.config.{limit_name} for more",
                RuntimeWarning, stacklevel=4)
            return eager(phi, x, y)
        except exc.TorchDynamoException as e:
            eager(phi, x, y)  # an error of the model or loss raises here, as with batching='vmap'
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CompileError(
                f"batching='compiled': torch.compile could not compile {type(ref()).__name__}'s per-task "
                f"gradient ({type(e).__name__}: {reason}). Inductor needs a working C++ compiler on the "
                "CPU (Triton on CUDA) and a forward it can trace whole (every call in it traceable by "
                "torch.compile, no graph break); pass batching='vmap' to run without compiling") from e

    return run
