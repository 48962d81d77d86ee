"""How a per-task function is run over the T tasks of a meta-batch.

``batching`` (an argument of :func:`imaml_ext.imaml` and :func:`imaml_ext.maml`):

* ``"vmap"``: ``torch.func.vmap`` with ``randomness="different"`` — one
  batched call for all tasks; random layers (dropout) draw independent
  values for every task.  Fast where PyTorch has batching rules for the
  model's operators; a model it cannot batch (an LSTM, data-dependent
  Python control flow, ``.item()``) raises :class:`BatchingError`.
  Batch-norm with batch statistics, 2-d max-pooling and 2-d convolutions
  with per-task weights are run folded: one ordinary call on
  ``[n, T·C, ...]`` (:class:`_TaskBatchNorm`, :class:`_TaskMaxPool2d`,
  :class:`_TaskConv2d`), cheaper than vmap's generic rules; with
  :data:`CHANNELS_LAST` set, the folded convolutions' activations are
  channels-last.
* ``"loop"``: a Python loop over the tasks, one ordinary call each, results
  stacked.  Runs any module that runs on one task; slower for small models.
* ``"compiled"``: ``"vmap"``, with the per-task gradients that keep no graph
  (the inner steps of iMAML and of first-order and checkpointed MAML)
  compiled by ``torch.compile`` (:mod:`imaml_ext.compiled`): tens of seconds
  to compile per model, input shape and dtype, then faster steps.
* ``"auto"``: :func:`choose` measures one gradient of the support loss both
  ways (and takes ``"loop"`` if vmap cannot batch the model), remembers the
  faster per architecture and input shape, and reports the decision.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter
from torch.autograd import forward_ad
from torch.func import vmap
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

from .switches import Switch

__all__ = ["BATCHING_MODES", "BatchingError", "over_tasks", "choose", "under_transform"]

BATCHING_MODES = ("vmap", "loop", "compiled", "auto")
_VMAP_FAILURE_MARKS = ("vmap", "batching rule", "batched tensor", "functorch")


#: Inside ``CHANNELS_LAST.set(True)`` (this thread), the folded convolutions on
#: CPU run on channels-last activations: ``[n, T·C, H, W]`` stored as
#: ``[n, H, W, T·C]``, which oneDNN's strided convolutions read without a
#: reordering copy.  Their outputs are channels-last too, so every layer after
#: them must take that layout (:func:`imaml_ext.fused_layers.runs_channels_last`
#: says which models do; :class:`imaml_ext.functional.TaskLoss` sets it).
CHANNELS_LAST: Switch[bool] = Switch("imaml_ext.channels_last", False)


class BatchingError(RuntimeError):
    """The model cannot be run under ``torch.func.vmap``; ``batching="loop"`` runs it."""


def is_vmap_failure(error: BaseException) -> bool:
    """True if ``error`` is PyTorch refusing to batch an operation under vmap."""
    message = str(error).lower()
    return isinstance(error, RuntimeError) and any(mark in message for mark in _VMAP_FAILURE_MARKS)


def _task_dim(t: Optional[torch.Tensor], dim: Optional[int], size: int, at: int) -> Optional[torch.Tensor]:
    """``t`` with its task dimension (``dim``; None: shared by all tasks) moved to ``at``."""
    if t is None:
        return None
    if dim is None:
        return t.unsqueeze(at).expand(*t.shape[:at], size, *t.shape[at:])
    return t.movedim(dim, at)


def _fold(x: torch.Tensor, dim: Optional[int], tasks: int) -> torch.Tensor:
    """Per-task ``[n, C, ...]`` batched at ``dim`` -> ``[n, T·C, ...]``: task t's channels
    at t·C ... t·C + C − 1.  A view when the tasks already sit beside the channels,
    as in the output of vmap's grouped convolution and of the folded layers here."""
    x = _task_dim(x, dim, tasks, 1)
    return x.reshape(x.shape[0], tasks * x.shape[2], *x.shape[3:])


def _per_task_vector(t: Optional[torch.Tensor], dim: Optional[int], tasks: int) -> Optional[torch.Tensor]:
    """A per-channel ``[C]`` vector batched at ``dim`` (None: shared) -> ``[T·C]`` in
    the folded channel order of :func:`_fold`; None stays None."""
    return None if t is None else _task_dim(t, dim, tasks, 0).reshape(-1)


def _unfold(out: torch.Tensor, tasks: int):
    """``[n, T·C, ...]`` -> ``[n, T, C, ...]`` batched at dim 1 (vmap's rule result)."""
    return out.view(out.shape[0], tasks, out.shape[1] // tasks, *out.shape[2:]), 1


class _UnderVmapOnly:
    """A channel-wise layer that vmap runs as one ordinary call on the folded
    ``[n, T·C, ...]`` layout (:func:`_fold`).  :meth:`run` takes the arguments
    of a call whose first tensor the innermost vmap batches
    (:func:`_directly_under_vmap`), unwraps the tensors that vmap batches and
    calls the subclass's ``folded(T, in_dims, *args) -> (out, out_dim)`` one
    transform level down, as torch.func does for an ``autograd.Function``'s
    vmap staticmethod, without that path's generic argument handling (about
    40 ms per iMAML meta-batch of 16 inner and 5 CG steps on the Omniglot net;
    benchmarks/bench_folded_dispatch.py).
    Autograd records the ordinary call, so first and second derivatives are
    PyTorch's own (or the folded call's own Functions')."""

    @classmethod
    def run(cls, *args):
        functorch = torch._C._functorch
        interpreter = retrieve_current_functorch_interpreter()
        level = interpreter.level()
        unwrapped = [functorch._unwrap_batched(a, level) if isinstance(a, torch.Tensor) else (a, None)
                     for a in args]
        with interpreter.lower():
            out, out_dim = cls.folded(interpreter.batch_size(), tuple(d for _, d in unwrapped),
                                      *(a for a, _ in unwrapped))
        return functorch._add_batch_dim(out, out_dim, level)


class _TaskBatchNorm(_UnderVmapOnly):
    """Batch-norm with batch statistics: per task x_t ``[n, C, ...]``, weight/bias ``[C]``.

    One ``F.batch_norm`` on ``[n, T·C, ...]`` with weight/bias ``[T·C]``
    normalises every (task, channel) pair over its own examples with its own
    affine parameters — the same numbers as T separate calls.  vmap's generic
    rule normalises without the affine part and applies weight and bias as
    broadcast multiplications whose derivatives cost more than the fused kernel's.
    """

    @staticmethod
    def folded(T, in_dims, x, weight, bias, eps):
        out = F.batch_norm(_fold(x, in_dims[0], T), None, None, _per_task_vector(weight, in_dims[1], T),
                           _per_task_vector(bias, in_dims[2], T), True, 0.0, eps)
        return _unfold(out, T)


class _TaskMaxPool2d(_UnderVmapOnly):
    """2-d max-pooling of per-task x_t ``[n, C, H, W]``: pooling is per channel,
    so one call on ``[n, T·C, H, W]`` gives T separate calls' numbers, without
    the copy that vmap's rule makes to put the tasks beside the examples."""

    @staticmethod
    def folded(T, in_dims, x, kernel_size, stride, padding, dilation, ceil_mode):
        out = F.max_pool2d(_fold(x, in_dims[0], T), kernel_size, stride, padding, dilation,
                           ceil_mode=ceil_mode)
        return _unfold(out, T)


class _TaskConv2d(_UnderVmapOnly):
    """2-d convolution of per-task x_t ``[n, C_in, H, W]`` with per-task weight
    ``[C_out, C_in/g, k, k]`` and bias ``[C_out]``: one grouped convolution on
    ``[n, T·C_in, H, W]`` with weight ``[T·C_out, ...]``, bias ``[T·C_out]`` and
    T·g groups.  vmap's rule forms the same grouped convolution without the
    bias and adds it afterwards (a pass over the output forward, a strided
    reduction for its gradient); here the convolution adds it."""

    @staticmethod
    def folded(T, in_dims, x, weight, bias, stride, padding, dilation, groups):
        w = _task_dim(weight, in_dims[1], T, 0)
        x_folded, w = _fold(x, in_dims[0], T), w.reshape(-1, *w.shape[2:])
        channels_last = x_folded.device.type == "cpu" and CHANNELS_LAST.get()
        if channels_last:
            # oneDNN then writes the output channels-last too: the layout carries from layer to
            # layer.  It wants the weight channels-last as well: copied once here, not again in
            # every backward and second derivative that reads it.
            x_folded = x_folded.contiguous(memory_format=torch.channels_last)
            w = w.contiguous(memory_format=torch.channels_last)
        args = (x_folded, w, _per_task_vector(bias, in_dims[2], T))
        if isinstance(padding, str) or any(t is not None and under_transform(t) or _has_tangent(t)
                                           for t in args):
            out = F.conv2d(*args, stride, padding, dilation, groups * T)
        else:
            conf = (_pair(stride), _pair(padding), _pair(dilation), groups * T)
            out = _GroupedConv2d.apply(*args, conf)
        if channels_last:  # an input of one channel in all (T·C_in = 1) is both layouts, and oneDNN picks NCHW
            out = out.contiguous(memory_format=torch.channels_last)
        return _unfold(out, T)


def _has_tangent(t: Optional[torch.Tensor]) -> bool:
    """A forward-mode AD tangent is attached to ``t`` (inside ``forward_ad.dual_level``)."""
    return t is not None and forward_ad.unpack_dual(t).tangent is not None


class _GroupedConv2d(torch.autograd.Function):
    """``F.conv2d`` (conf = stride, padding, dilation, groups) whose backward is
    :class:`_GroupedConv2dGrad`, so that a second derivative (full MAML, the
    reverse-mode HVP) takes three native grouped convolutions where PyTorch's
    double backward of a grouped convolution loops over the groups."""

    @staticmethod
    def forward(ctx, x, weight, bias, conf):
        ctx.save_for_backward(x, weight)
        ctx.conf, ctx.has_bias = conf, bias is not None
        return F.conv2d(x, weight, bias, *conf)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        gx, gw, gb = _GroupedConv2dGrad.apply(grad, x, weight, ctx.has_bias, mask, ctx.conf)
        return gx, gw, gb, None


class _GroupedConv2dGrad(torch.autograd.Function):
    """(dL/dout, x, weight) -> (dL/dx, dL/dweight, dL/dbias) of a convolution, each
    where ``mask`` asks for it.  Its backward, with (u, v, c) the gradients of
    those three: dL/dout gets conv(u, W) + conv(x, v) + c, x gets the input
    gradient of conv(x, v) at dL/dout, W the weight gradient of conv(u, W) at
    dL/dout (the products are bilinear: ⟨u, ∂x⟨g, conv(x, W)⟩⟩ = ⟨g, conv(u, W)⟩).
    Those are differentiable PyTorch ops, so higher derivatives follow from them."""

    @staticmethod
    def forward(ctx, grad, x, weight, has_bias, mask, conf):
        ctx.save_for_backward(grad, x, weight)
        ctx.conf, ctx.has_bias = conf, has_bias
        stride, padding, dilation, groups = conf
        return torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if has_bias else None, stride, padding, dilation, False,
            [0, 0], groups, [mask[0], mask[1], mask[2] and has_bias])

    @staticmethod
    def backward(ctx, u, v, c):
        grad, x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = conf = ctx.conf
        need_grad, need_x, need_w = ctx.needs_input_grad[:3]
        d_grad = d_x = d_w = None
        if need_grad:  # None where u, v and c are all None: a zero gradient
            for term in (F.conv2d(u, weight, None, *conf) if u is not None else None,
                         F.conv2d(x, v, None, *conf) if v is not None else None,
                         c[:, None, None] if c is not None else None):
                if term is not None:
                    d_grad = term if d_grad is None else d_grad + term
        if need_x and v is not None:
            d_x = torch.ops.aten.convolution_backward(grad, x, v, None, stride, padding, dilation, False,
                                                      [0, 0], groups, [True, False, False])[0]
        if need_w and u is not None:
            d_w = torch.ops.aten.convolution_backward(grad, u, weight, None, stride, padding, dilation,
                                                      False, [0, 0], groups, [False, True, False])[1]
        return d_grad, d_x, d_w, None, None, None


def under_transform(t: torch.Tensor) -> bool:
    """True if ``t`` is wrapped by a ``torch.func`` transform being computed."""
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check is not None and check(t))


def _directly_under_vmap(t: torch.Tensor) -> bool:
    """True if the innermost torch.func transform running is vmap and ``t`` is batched by it."""
    functorch = torch._C._functorch
    if functorch.peek_interpreter_stack() is None or not functorch.is_batchedtensor(t):
        return False
    top = retrieve_current_functorch_interpreter()
    return top.key() == functorch.TransformType.Vmap and functorch.maybe_get_level(t) == top.level()


def _batch_norm_call(input, running_mean, running_var, weight=None, bias=None, training=False,
                     momentum=0.1, eps=1e-5):
    """:class:`_TaskBatchNorm`'s arguments for an ``F.batch_norm`` call with
    batch statistics, else None."""
    if running_mean is not None or running_var is not None or not training or input.dim() < 2:
        return None
    return input, weight, bias, float(eps)


def _max_pool2d_call(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                     return_indices=False):
    """:class:`_TaskMaxPool2d`'s arguments for an ``F.max_pool2d`` call on
    ``[n, C, H, W]`` without indices, else None."""
    if return_indices or input.dim() != 4:
        return None
    return input, kernel_size, stride, padding, dilation, ceil_mode


def _conv2d_call(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """:class:`_TaskConv2d`'s arguments for an ``F.conv2d`` call on ``[n, C, H, W]``
    whose weight is per task (batched by the innermost vmap), else None."""
    if input.dim() != 4 or not _directly_under_vmap(weight):
        return None
    return input, weight, bias, stride, padding, dilation, groups


# F.<layer> -> (its Function, the arguments of that Function or None where it does not apply)
_FOLDED = {F.batch_norm: (_TaskBatchNorm, _batch_norm_call),
           F.max_pool2d: (_TaskMaxPool2d, _max_pool2d_call),
           F.conv2d: (_TaskConv2d, _conv2d_call)}


class _BatchedLayers(TorchFunctionMode):
    """Inside :func:`_vmapped`: the layers in :data:`_FOLDED` called on a tensor
    batched by the innermost vmap run as their folded Function; every other
    call runs as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        folded = _FOLDED.get(func)
        if folded is not None and args and isinstance(args[0], torch.Tensor) \
                and _directly_under_vmap(args[0]):
            call = folded[1](*args, **kwargs)
            if call is not None:
                return folded[0].run(*call)
        return func(*args, **kwargs)


def _vmapped(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    batched = vmap(fn, randomness="different")

    def run(*args: torch.Tensor) -> torch.Tensor:
        try:
            with _BatchedLayers():
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
