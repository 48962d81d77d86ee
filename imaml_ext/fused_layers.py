"""Batch-norm, ReLU and max-pooling as one layer: the block of MAML's conv nets.

``BatchNorm2d`` with batch statistics, ``ReLU`` and a k×k ``MaxPool2d`` of
stride k in a row (k = 1: no pooling) run as the operator
``torch.ops.imaml_ext_layers.bn_relu_pool``.  Per channel c of x ``[N, C, H, W]``,
with μ_c, σ²_c the mean and biased variance over its N·H·W values,

    y = γ_c (x − μ_c)/√(σ²_c + ε) + β_c,     out = relu(maxpool_k(y))  ``[N, C, H/k, W/k]``,

the numbers of the three PyTorch layers (max-pool's rule: the first maximum of
a window, or a NaN, wins).  The compiled CPU kernel (csrc/bn_relu_pool.cpp)
reads x twice and writes the pooled output, a one-byte window index and the x
at each window's maximum, where the three layers write and keep two full-size
activations and int64 indices; its backward needs the batch-norm sums only at
the window maxima.
Other devices, or a missing build, run the same operator in PyTorch ops.

Autograd: first derivatives come from the operator's backward
``bn_relu_pool_backward``; a backward taken with ``create_graph=True`` returns
that operator's result as a differentiable function of the incoming gradient,
x and the weight, whose own backward is the operator
``bn_relu_pool_double_backward`` (second derivatives: full MAML's inner loop,
reverse-mode Hessian-vector products; the formulas are in
:func:`reference_double_backward`); forward-mode AD tangents on those
cotangents go through the same operator, which is linear in them.  Third
derivatives differentiate the three layers recomputed with batch-norm
written out in elementary ops; so does a backward under a ``torch.func``
transform or with forward-mode tangents on the incoming gradient.  Under
``vmap`` the layer runs folded over the tasks (one call on ``[n, T·C, H, W]``,
as :mod:`imaml_ext.batching` folds batch-norm); under any other ``torch.func``
transform it runs as the three layers.

:func:`fuse` is where the layer comes from: a copy of a model's module tree in
which every ``BatchNorm2d`` → ``ReLU`` run inside an ``nn.Sequential`` is one
:class:`BnReluPool`, with the next ``MaxPool2d`` when it has k ≥ 2 (else
k = 1), with the same parameter names and objects.  Without pooling the
operator runs on planes of at least :data:`MIN_UNPOOLED_PLANE` values and
smaller ones run the two layers, where the operator's first derivative was
measured slower; a channels-last x without pooling runs the kernel's row
path (channels contiguous, the statistics summed down the rows) at any plane
size, and its outputs and gradients are channels-last too.  Models whose
every batch-norm is such a layer (:func:`runs_channels_last`) run their
folded convolutions channels-last (:data:`imaml_ext.batching.CHANNELS_LAST`).
:func:`unfused` turns the layer back into the three layers inside a ``with``
block (this thread); ``IMAML_EXT_NO_FUSION=1`` turns it off everywhere.
"""
from __future__ import annotations

import copy
import os
from typing import ContextManager, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad

from . import _build
from .batching import (_directly_under_vmap, _fold, _has_tangent, _per_task_vector, _unfold, _UnderVmapOnly,
                       under_transform)
from .switches import Switch

__all__ = ["BnReluPool", "bn_relu_pool", "fuse", "fused_for", "follow_modes", "runs_channels_last", "unfused",
           "fusion_enabled", "status",
           "reference_forward", "reference_backward", "reference_double_backward", "DISABLE_ENV", "MAX_KERNEL",
           "INACTIVE"]

NAMESPACE = "imaml_ext_layers"
DISABLE_ENV = "IMAML_EXT_NO_FUSION"
#: The largest pooling window; k·k positions fit below :data:`INACTIVE` in a byte.
MAX_KERNEL = 15
#: ``index`` value of a window whose maximum is ≤ 0 (ReLU passes no gradient).
INACTIVE = 255

_DTYPES = (torch.float32, torch.float64)  # what the operator takes; other dtypes run the three layers
#: Without pooling (k = 1) the operator runs on H·W planes of at least this many
#: values; below it the kernel's cost per plane made the first derivative slower
#: than PyTorch's two layers (benchmarks/RESULTS.md, "own second derivative").
MIN_UNPOOLED_PLANE = 49
_FUSION: Switch[bool] = Switch("imaml_ext.fusion", True)  # False inside unfused()


def fusion_enabled() -> bool:
    """False inside :func:`unfused` and when ``IMAML_EXT_NO_FUSION`` is set (not "" or "0")."""
    return _FUSION.get() and os.environ.get(DISABLE_ENV, "") in ("", "0")


def unfused() -> ContextManager[None]:
    """Inside the ``with`` block, :class:`BnReluPool` runs as its three PyTorch layers (this thread)."""
    return _FUSION.set(False)


def _check(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: Optional[float],
           kernel: int) -> None:
    """The argument rules of the operators (csrc/bn_relu_pool.cpp's check_forward; ``eps``
    None: the backward, which takes none)."""
    if x.dim() != 4:
        raise ValueError(f"bn_relu_pool: x must be [N, C, H, W], got {x.dim()} dimensions")
    if x.dtype not in _DTYPES:
        raise ValueError(f"bn_relu_pool: x must be float32 or float64, got {x.dtype}")
    if not 1 <= kernel <= MAX_KERNEL:
        raise ValueError(f"bn_relu_pool: kernel must be in 1..{MAX_KERNEL}, got {kernel}")
    if eps is not None and not eps > 0:
        raise ValueError(f"bn_relu_pool: eps must be positive, got {eps}")
    n, c, h, w = x.shape
    if h < kernel or w < kernel:
        raise ValueError(f"bn_relu_pool: the {kernel}x{kernel} pooling window does not fit in {h}x{w}")
    if n * h * w <= 1:
        raise ValueError(f"bn_relu_pool: batch statistics need more than 1 value per channel, "
                         f"got N*H*W = {n * h * w}")
    for t in (weight, bias):
        if t is not None and (t.shape != (c,) or t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"bn_relu_pool: weight and bias must be [C] = [{c}] of x's dtype and device")


def _layout(x: Tensor, kernel: int) -> torch.memory_format:
    """The memory format of every x-shaped tensor in and out of the operators:
    channels-last for a channels-last x without pooling (the kernel's row
    path), else contiguous (csrc/bn_relu_pool.cpp's ``channels_last``)."""
    rows = kernel == 1 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if rows else torch.contiguous_format


def reference_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                      kernel: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out ``[N, C, H/k, W/k]``, mean ``[C]``, invstd ``[C]``, index uint8 and xmax
    ``[N, C, H/k, W/k]``): the reference kernel, in PyTorch ops.  ``index`` holds
    the window position (row·k + column) of each maximum, :data:`INACTIVE` where
    it is ≤ 0; ``xmax`` the x there (for k = 1 it is empty: x itself)."""
    _check(x, weight, bias, eps, kernel)
    layout = _layout(x, kernel)
    x = x.contiguous(memory_format=layout)
    var, mean = torch.var_mean(x, (0, 2, 3), correction=0)
    invstd = torch.rsqrt(var + eps)
    a = invstd if weight is None else invstd * weight
    y = (x - mean[:, None, None]) * a[:, None, None]
    pooled, flat = F.max_pool2d(y if bias is None else y + bias[:, None, None], kernel, kernel,
                                return_indices=True)
    w = x.shape[3]
    position = (flat // w % kernel) * kernel + flat % w % kernel
    active = ~(pooled <= 0)
    n, c = x.shape[:2]
    xmax = x.new_empty(0, *pooled.shape[1:]) if kernel == 1 else \
        x.view(n, c, -1).gather(2, flat.view(n, c, -1)).view_as(pooled)
    return (torch.where(active, pooled, 0.0).contiguous(memory_format=layout), mean, invstd,
            torch.where(active, position, INACTIVE).to(torch.uint8).contiguous(memory_format=layout),
            xmax.contiguous())


def _maxima(index: Tensor, kernel: int, h: int, w: int) -> Tuple[Tensor, Tensor]:
    """(flat position ``[N, C, Ho·Wo]`` int64 in the ``[H·W]`` plane of each window's
    maximum, active ``[N, C, Ho, Wo]`` bool) from the forward's ``index``."""
    n, c, ho, wo = index.shape
    active = index != INACTIVE
    position = torch.where(active, index, 0).long()
    rows = torch.arange(ho, device=index.device)[:, None] * kernel + position // kernel
    cols = torch.arange(wo, device=index.device)[None, :] * kernel + position % kernel
    return (rows * w + cols).view(n, c, -1), active


def _scatter_to_maxima(pooled: Tensor, flat: Tensor, active: Tensor, shape) -> Tensor:
    """``[N, C, H, W]``: ``pooled`` at each active window's maximum, 0 elsewhere
    (windows do not overlap)."""
    n, c = shape[:2]
    return pooled.new_zeros(n, c, shape[2] * shape[3]).scatter_(
        2, flat, torch.where(active, pooled, 0.0).reshape(n, c, -1)).view(shape)


def reference_backward(grad: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, invstd: Tensor,
                       index: Tensor, xmax: Tensor, kernel: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(dL/dx, dL/dweight, dL/dbias) from dL/dout: the reference kernel."""
    _check(x, weight, None, None, kernel)
    n, c, h, w = x.shape
    g = _scatter_to_maxima(grad, *_maxima(index, kernel, h, w), x.shape)  # dL/dy
    xhat = (x - mean[:, None, None]) * invstd[:, None, None]
    count = n * h * w
    sum_g, sum_gx = g.sum((0, 2, 3)), (g * xhat).sum((0, 2, 3))
    k1 = invstd if weight is None else invstd * weight
    grad_x = k1[:, None, None] * (g - (sum_g / count)[:, None, None] - xhat * (sum_gx / count)[:, None, None])
    return grad_x.contiguous(memory_format=_layout(x, kernel)), sum_gx, sum_g


def reference_double_backward(grad_grad_x: Optional[Tensor], grad_grad_weight: Optional[Tensor],
                              grad_grad_bias: Optional[Tensor], grad: Tensor, x: Tensor,
                              weight: Optional[Tensor], mean: Tensor, invstd: Tensor, index: Tensor,
                              xmax: Tensor, kernel: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The reference kernel of the backward's own backward: for (dx, dγ, dβ) =
    :func:`reference_backward` (grad, x, weight, …) and their cotangents u ``[N, C, H, W]``,
    u_γ, u_β ``[C]`` (None: zero), the gradients of L = ⟨u, dx⟩ + ⟨u_γ, dγ⟩ + ⟨u_β, dβ⟩
    with respect to grad ``[N, C, H/k, W/k]``, x ``[N, C, H, W]`` (through the batch
    statistics as well) and weight ``[C]`` (γ = 1 when None).  ReLU and the window
    maxima are piecewise constant: they only place g = dL/dy.

    Per channel, with r = invstd, x̂ = (x − μ)r, M = N·H·W, P v = v − mean(v) − x̂·mean(x̂v)
    (so that dx = γr·Pg and dx̂ = r·P dx), ḡ = mean(g), A = mean(g x̂), ū = mean(u),
    B = mean(u x̂), C = mean(u g):

        dL/dg = γr·Pu + u_γ x̂ + u_β,           dL/dγ = rM (C − ḡū − AB),
        dL/dx = −γr²[(C − ḡū − AB) x̂ + B·Pg + A·Pu] + u_γ r·Pg.
    """
    _check(x, weight, None, None, kernel)
    n, c, h, w = x.shape
    count = n * h * w
    flat, active = _maxima(index, kernel, h, w)
    g = _scatter_to_maxima(grad, flat, active, x.shape)
    r = invstd[:, None, None]
    gamma = 1.0 if weight is None else weight[:, None, None]
    xhat = (x - mean[:, None, None]) * r
    zero = x.new_zeros(c)
    u_w = zero if grad_grad_weight is None else grad_grad_weight
    u_b = zero if grad_grad_bias is None else grad_grad_bias

    def mean_c(t: Tensor) -> Tensor:
        return (t.sum((0, 2, 3)) / count)[:, None, None]

    g_bar, A = mean_c(g), mean_c(g * xhat)
    u = torch.zeros_like(x) if grad_grad_x is None else grad_grad_x
    u_bar, B, C = mean_c(u), mean_c(u * xhat), mean_c(u * g)
    Pg, Pu = g - g_bar - A * xhat, u - u_bar - B * xhat
    dg = gamma * r * Pu + u_w[:, None, None] * xhat + u_b[:, None, None]
    d_grad = torch.where(active, dg.reshape(n, c, -1).gather(2, flat).view_as(grad), 0.0)
    d_weight = (r * count * (C - g_bar * u_bar - A * B)).view(c)
    d_x = -gamma * r * r * ((C - g_bar * u_bar - A * B) * xhat + B * Pg + A * Pu) + u_w[:, None, None] * r * Pg
    layout = _layout(x, kernel)
    return d_grad.contiguous(memory_format=layout), d_x.contiguous(memory_format=layout), d_weight


# The operators, with the reference kernels as their default; csrc/bn_relu_pool.cpp
# registers the CPU kernels when the compiled library loads.
_op = torch.library.custom_op(f"{NAMESPACE}::bn_relu_pool", reference_forward, mutates_args=())
_backward_op = torch.library.custom_op(f"{NAMESPACE}::bn_relu_pool_backward", reference_backward,
                                       mutates_args=())
_double_backward_op = torch.library.custom_op(f"{NAMESPACE}::bn_relu_pool_double_backward",
                                              reference_double_backward, mutates_args=())


@_op.register_fake
def _(x, weight, bias, eps, kernel):
    _check(x, weight, bias, eps, kernel)
    n, c, h, w = x.shape
    pooled, layout = (n, c, h // kernel, w // kernel), _layout(x, kernel)
    return (x.new_empty(pooled).contiguous(memory_format=layout), x.new_empty(c), x.new_empty(c),
            x.new_empty(pooled, dtype=torch.uint8).contiguous(memory_format=layout),
            x.new_empty((0 if kernel == 1 else n,) + pooled[1:]))


@_backward_op.register_fake
def _(grad, x, weight, mean, invstd, index, xmax, kernel):
    _check(x, weight, None, None, kernel)
    return torch.empty_like(x, memory_format=_layout(x, kernel)), x.new_empty(x.shape[1]), x.new_empty(x.shape[1])


@_double_backward_op.register_fake
def _(grad_grad_x, grad_grad_weight, grad_grad_bias, grad, x, weight, mean, invstd, index, xmax, kernel):
    _check(x, weight, None, None, kernel)
    layout = _layout(x, kernel)
    return (torch.empty_like(grad, memory_format=layout), torch.empty_like(x, memory_format=layout),
            x.new_empty(x.shape[1]))


def _relu_pool(y: Tensor, kernel: int) -> Tensor:
    out = F.relu(y)
    return out if kernel == 1 else F.max_pool2d(out, kernel, kernel)


def _unfused(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, kernel: int) -> Tensor:
    """The three PyTorch layers the operator replaces."""
    return _relu_pool(F.batch_norm(x, None, None, weight, bias, True, 0.0, eps), kernel)


def _written_out(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, kernel: int) -> Tensor:
    """:func:`_unfused` with batch-norm in elementary ops, whose derivatives go to every
    order (PyTorch's batch-norm stops at the second)."""
    var, mean = torch.var_mean(x, (0, 2, 3), correction=0, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight[:, None, None]
    if bias is not None:
        y = y + bias[:, None, None]
    return _relu_pool(y, kernel)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, eps, kernel = inputs
    _, mean, invstd, index, xmax = output
    ctx.mark_non_differentiable(mean, invstd, index, xmax)  # what the backward needs, not results
    ctx.save_for_backward(x, weight, bias, mean, invstd, index, xmax)
    ctx.eps, ctx.kernel = eps, kernel


def _layers_vjp(grad: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                kernel: int, layers=_unfused) -> Tuple[Optional[Tensor], ...]:
    """(dL/dx, dL/dweight, dL/dbias) of the three layers recomputed (``layers``: :func:`_unfused`
    or :func:`_written_out`; None for an absent weight or bias), from dL/dout = grad.
    torch.func.vjp differentiates with respect to these tensors alone (not through
    one of them to another, as autograd.grad would)."""
    given = [t for t in (x, weight, bias) if t is not None]

    def recomputed(*tensors):
        it = iter(tensors)
        return layers(*(None if t is None else next(it) for t in (x, weight, bias)), eps, kernel)

    found = iter(torch.func.vjp(recomputed, *given)[1](grad))
    return tuple(None if t is None else next(found) for t in (x, weight, bias))


class _LayerBackward(torch.autograd.Function):
    """The operator's backward (dx, dweight, dbias) as a differentiable function of
    (grad, x, weight): what a ``create_graph=True`` backward returns.  Its own
    backward is the operator ``bn_relu_pool_double_backward`` (second derivatives:
    full MAML, reverse Hessian-vector products); a third derivative, or one taken
    under a torch.func transform, differentiates the three layers recomputed with
    batch-norm written out (:func:`_written_out`)."""

    @staticmethod
    def forward(grad, x, weight, bias, mean, invstd, index, xmax, eps, kernel):
        return _backward_op(grad, x, weight, mean, invstd, index, xmax, kernel)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, x, weight, bias, mean, invstd, index, xmax, eps, kernel = inputs
        ctx.save_for_backward(grad, x, weight, bias, mean, invstd, index, xmax)
        ctx.eps, ctx.kernel = eps, kernel
        ctx.set_materialize_grads(False)  # an unused output's cotangent stays None, not zeros

    @staticmethod
    def backward(ctx, grad_grad_x, grad_grad_weight, grad_grad_bias):
        grad, x, weight, bias, mean, invstd, index, xmax = ctx.saved_tensors
        cotangents = (grad_grad_x, grad_grad_weight if weight is not None else None,
                      grad_grad_bias if bias is not None else None)
        dual = any(_has_tangent(t) for t in cotangents)
        if torch.is_grad_enabled() and dual:
            raise NotImplementedError(
                "bn_relu_pool: forward-mode AD tangents on a third derivative through the fused layer "
                f"are not supported; run the model inside imaml_ext.fused_layers.unfused() or set {DISABLE_ENV}=1")
        if torch.is_grad_enabled() or any(t is not None and under_transform(t) for t in cotangents):
            wrt = [t for t in (grad, x, weight) if t is not None]

            def first(*tensors):
                g, xx, *w = tensors
                found = _layers_vjp(g, xx, w[0] if w else None, bias, ctx.eps, ctx.kernel, _written_out)
                return tuple(f for f in found if f is not None)

            outs, pullback = torch.func.vjp(first, *wrt)
            given = iter(zip(outs, (c for c, t in zip(cotangents, (x, weight, bias)) if t is not None)))
            d = iter(pullback(tuple(torch.zeros_like(o) if v is None else v for o, v in given)))
            d_grad, d_x = next(d), next(d)
            d_weight = next(d, None)
        else:
            def double_backward(given):
                u, u_w, u_b = given
                return _double_backward_op(None if u is None else u.contiguous(memory_format=_layout(x, ctx.kernel)),
                                           *(None if t is None else t.contiguous() for t in (u_w, u_b)), grad, x,
                                           weight, mean, invstd, index, xmax, ctx.kernel)

            if dual:  # forward-mode AD: the operator is linear in the cotangents, so in their tangents
                parts = [(None, None) if t is None else forward_ad.unpack_dual(t)[:2] for t in cotangents]
                primal, tangent = double_backward([p for p, _ in parts]), double_backward([t for _, t in parts])
                d_grad, d_x, d_weight = (forward_ad.make_dual(p, t) for p, t in zip(primal, tangent))
            else:
                d_grad, d_x, d_weight = double_backward(cotangents)
        # the derivatives do not depend on the bias (it only moves the ReLU's and the
        # windows' piecewise-constant choices): zero, as PyTorch's layers give it
        d_bias = torch.zeros_like(bias) if ctx.needs_input_grad[3] else None
        return (d_grad, d_x, None if weight is None else d_weight, d_bias) + (None,) * 6


def _autograd_backward(ctx, grad, *_unused):
    x, weight, bias, mean, invstd, index, xmax = ctx.saved_tensors
    if under_transform(grad) or _has_tangent(grad):  # is_grads_batched, forward-mode AD: no rules for those
        return (*_layers_vjp(grad, x, weight, bias, ctx.eps, ctx.kernel), None, None)
    grad = grad.contiguous(memory_format=_layout(x, ctx.kernel))
    if torch.is_grad_enabled():  # create_graph=True
        found = _LayerBackward.apply(grad, x, weight, bias, mean, invstd, index, xmax, ctx.eps, ctx.kernel)
    else:
        found = _backward_op(grad, x, weight, mean, invstd, index, xmax, ctx.kernel)
    grad_x, grad_w, grad_b = found
    return (grad_x, None if weight is None else grad_w, None if bias is None else grad_b, None, None)


_op.register_autograd(_autograd_backward, setup_context=_setup_context)


class _TaskBnReluPool(_UnderVmapOnly):
    """The layer under vmap: one operator call on the folded ``[n, T·C, H, W]``
    with weight and bias ``[T·C]`` (per-task statistics, as T separate calls)."""

    @staticmethod
    def folded(T, in_dims, x, weight, bias, eps, kernel):
        return _unfold(_fused_or_layers(_fold(x, in_dims[0], T), _per_task_vector(weight, in_dims[1], T),
                                        _per_task_vector(bias, in_dims[2], T), eps, kernel), T)


def _fused_or_layers(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                     kernel: int) -> Tensor:
    """The operator's output on plain tensors; the PyTorch layers instead for a
    contiguous x without pooling whose planes are smaller than
    :data:`MIN_UNPOOLED_PLANE` (a channels-last x runs the kernel's row path
    at any plane size)."""
    if kernel == 1 and x.shape[2] * x.shape[3] < MIN_UNPOOLED_PLANE \
            and _layout(x, kernel) is torch.contiguous_format:
        return _unfused(x, weight, bias, eps, kernel)
    return _op(x, weight, bias, eps, kernel)[0]


def _single_vmap_level(t: Optional[Tensor]) -> bool:
    """``t`` is plain, or batched by the innermost vmap with nothing else around it."""
    if t is None or not under_transform(t):
        return True
    return _directly_under_vmap(t) and not under_transform(torch._C._functorch.get_unwrapped(t))


def _path(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], kernel: int) -> str:
    """How :func:`bn_relu_pool` runs: ``"operator"`` (plain tensors), ``"folded"`` (x
    batched by one vmap and nothing else) or ``"layers"`` (the three PyTorch layers:
    fusion off, a dtype or size the operator does not take, forward-mode AD or
    another torch.func transform, which the operator has no rules for)."""
    if not fusion_enabled() or x.dtype not in _DTYPES or x.dim() != 4 \
            or x.shape[0] * x.shape[2] * x.shape[3] <= 1:
        return "layers"
    tensors = (x, weight, bias)
    if not any(t is not None and under_transform(t) for t in tensors):
        return "layers" if any(_has_tangent(t) for t in tensors) else "operator"
    if _directly_under_vmap(x) and all(_single_vmap_level(t) for t in tensors):
        unwrapped = [None if t is None else torch._C._functorch.get_unwrapped(t) if under_transform(t) else t
                     for t in tensors]
        return "layers" if any(_has_tangent(t) for t in unwrapped) else "folded"
    return "layers"


def bn_relu_pool(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5,
                 kernel: int = 2) -> Tensor:
    """relu(maxpool_k(batch_norm(x))) of x ``[N, C, H, W]`` with batch statistics,
    weight/bias ``[C]`` or None (module docstring); ``[N, C, H/k, W/k]``."""
    path = _path(x, weight, bias, kernel)
    if path == "layers":
        return _unfused(x, weight, bias, eps, kernel)
    _build.backend()  # loads the compiled kernels on first use
    if path == "operator":
        return _fused_or_layers(x, weight, bias, eps, kernel)
    return _TaskBnReluPool.run(x, weight, bias, eps, kernel)


class BnReluPool(nn.Module):
    """``BatchNorm2d`` (batch statistics) → ``ReLU`` → ``MaxPool2d(k)`` as one layer.

    Holds the batch-norm's own ``weight`` and ``bias`` parameters (or none),
    so that a module tree keeps its parameter names when :func:`fuse` puts
    this layer where the batch-norm was.
    """

    def __init__(self, norm: nn.BatchNorm2d, kernel: int = 1):
        super().__init__()
        self.weight, self.bias = norm.weight, norm.bias
        self.eps, self.kernel = float(norm.eps), int(kernel)

    def forward(self, x: Tensor) -> Tensor:
        return bn_relu_pool(x, self.weight, self.bias, self.eps, self.kernel)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, kernel={self.kernel}"


def _pool_kernel(m: nn.Module) -> Optional[int]:
    """k for a ``MaxPool2d`` of k×k windows at stride k, no padding or dilation; else None."""
    if type(m) is not nn.MaxPool2d or m.return_indices or m.ceil_mode:
        return None
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    k, s = pair(m.kernel_size), pair(m.stride if m.stride is not None else m.kernel_size)
    if k[0] != k[1] or s != k or pair(m.padding) != (0, 0) or pair(m.dilation) != (1, 1):
        return None
    return k[0] if 1 <= k[0] <= MAX_KERNEL else None


def _batch_statistics(m: nn.Module) -> bool:
    """A plain ``BatchNorm2d`` that always normalises with the batch's statistics."""
    return type(m) is nn.BatchNorm2d and m.running_mean is None and m.running_var is None


def _has_hooks(m: nn.Module) -> bool:
    """Forward or backward hooks on ``m`` itself (a fused run would skip them)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _fuse_sequence(children: dict) -> bool:
    """Replaces the runs in an ``nn.Sequential``'s children in place; True if any."""
    names = list(children)
    found, i = False, 0
    while i + 1 < len(names):
        norm, act = children[names[i]], children[names[i + 1]]
        if not (_batch_statistics(norm) and type(act) is nn.ReLU) or _has_hooks(norm) or _has_hooks(act):
            i += 1
            continue
        pool = children[names[i + 2]] if i + 2 < len(names) else None
        k = _pool_kernel(pool) if pool is not None and not _has_hooks(pool) else None
        run = 3 if k is not None and k > 1 else 2  # with its pool, or batch-norm and ReLU alone
        children[names[i]] = BnReluPool(norm, k if run == 3 else 1)
        for name in names[i + 1:i + run]:
            children[name] = nn.Identity()
        found, i = True, i + run
    return found


def _fused_tree(module: nn.Module, twins: list) -> nn.Module:
    children = {name: (None if child is None else _fused_tree(child, twins))
                for name, child in module._modules.items()}
    changed = any(children[name] is not child for name, child in module._modules.items())
    if isinstance(module, nn.Sequential):
        changed = _fuse_sequence(children) or changed
    if not changed:
        return module
    twin = copy.copy(module)
    # its own parameter, buffer and hook tables (a shallow copy would share them)
    twin.__dict__.update({k: copy.copy(v) for k, v in module.__dict__.items() if isinstance(v, (dict, set))})
    twin._modules = children
    twins.append((twin, module))
    return twin


def fuse(model: nn.Module) -> nn.Module:
    """``model`` with every ``BatchNorm2d`` (batch statistics) → ``ReLU`` run inside an
    ``nn.Sequential``, with the ``MaxPool2d(k)`` after it if there is one (k ≥ 2,
    stride k, no padding; else k = 1 and the pool stays), as one
    :class:`BnReluPool` (modules with hooks stay as they are); the modules on the way to a run are shallow copies
    with their own tables (:func:`follow_modes` keeps their training flags
    those of the originals), everything else is ``model``'s own (same
    parameters, same names; ``model`` is not changed).  ``model`` itself when
    there is no such run or the tree cannot be copied (a ScriptModule)."""
    if isinstance(model, torch.jit.ScriptModule):
        return model
    twins: list = []
    fused = _fused_tree(model, twins)
    if fused is not model:
        fused.__dict__["_fused_twins"] = twins
    return fused


def follow_modes(fused: nn.Module) -> None:
    """Sets the training flag of the copied modules of :func:`fuse` (fused) to their
    originals' (``model.eval()`` after fusing reaches only the originals)."""
    for twin, original in fused.__dict__.get("_fused_twins", ()):
        twin.training = original.training


def runs_channels_last(runner: nn.Module) -> bool:
    """Whether ``runner`` (from :func:`fused_for`) should run its folded convolutions
    channels-last (:data:`imaml_ext.batching.CHANNELS_LAST`): it has a ``Conv2d``
    and every batch-norm in it is a :class:`BnReluPool` without pooling, whose
    CPU kernel has a channels-last path (PyTorch's batch-norm double backward
    is slow on that layout, and the pooling kernel reads contiguous planes)."""
    modules = list(runner.modules())
    fused = [m for m in modules if isinstance(m, BnReluPool)]
    return (bool(fused) and all(m.kernel == 1 for m in fused) and any(isinstance(m, nn.Conv2d) for m in modules)
            and not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in modules))


def _cpu_kernel_loaded() -> bool:
    return _build.backend().cpu and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"{NAMESPACE}::bn_relu_pool", "CPU")


def status() -> str:
    """One line for ``imaml-ext info``: whether CPU models run the fused layer, and why not."""
    if not _cpu_kernel_loaded():
        return "off (no compiled CPU kernel for it)"
    if not fusion_enabled():
        return f"off ({DISABLE_ENV} is set)"
    return "on for CPU models (BatchNorm2d → ReLU runs in nn.Sequential, with the MaxPool2d after them)"


def fused_for(model: nn.Module, device: torch.device) -> nn.Module:
    """What to run ``model``'s computation on ``device`` with: :func:`fuse` (model) where
    the compiled CPU kernel serves (a CPU device, a loaded CPU build that has
    the operator's kernel), else ``model`` (the operator's PyTorch reference
    would only be slower than the three layers)."""
    if device.type != "cpu" or not _cpu_kernel_loaded():
        return model
    return fuse(model)
