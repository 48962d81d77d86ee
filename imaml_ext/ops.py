"""Fused ops over flat [T, P] buffers (T tasks, P parameters per task).

Each op is declared once, in :data:`_OPS` below, as the operator
``torch.ops.imaml_ext.<name>``; the dispatcher picks its kernel by device:

- the compiled kernels (csrc/, CPU and CUDA) register for their device when
  :mod:`imaml_ext._build` loads them, on the first call of any op;
- for a device without compiled kernels (library not built, or only its CPU
  half), the pure-PyTorch reference of the same name in :data:`reference`
  registers instead, behind the same argument checks (csrc/checks.h, mirrored
  by :class:`_Args`) and with identical semantics;
- a fake kernel (the argument checks, then the output's metadata) serves meta
  and fake tensors (torch.compile, :func:`torch.library.opcheck`);
- :func:`batched_dot` and :func:`batched_sq_norm` are differentiable on every
  path (``register_autograd``).

:func:`imaml_ext.backend` says which kernels run and why; :func:`use_reference`
swaps the compiled kernels for the reference ones for an in-process A/B.

All tensors of one call live on one device and share one floating dtype
(float32 or float64; ``state`` is int32); all are contiguous. A bad argument
raises ValueError, a tensor an op writes that shares memory with its other
arguments ([T, P] or per-task) RuntimeError, with the same message on every path. Mutating ops
(trailing underscore) write their outputs in place and return ``None``. None
of the ops synchronises with the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import threading
import types
from typing import Callable, Iterator, Optional

import torch

from . import _build

__all__ = [
    "cg_step_",
    "prox_sgd_step_",
    "adjoint_sgd_step_",
    "batched_dot",
    "batched_sq_norm",
    "reference",
    "use_reference",
    "CGState",
]


class CGState(enum.IntEnum):
    """Per-task outcome of conjugate gradient, the int32 ``state`` of :func:`cg_step_`.

    The same codes are declared for the kernels in csrc/cg_state.h.
    """

    RUNNING = 0                #: still iterating (after the last step: max_iter reached)
    CONVERGED = 1              #: r'r <= threshold_sq
    NONPOSITIVE_CURVATURE = 2  #: stopped on p'Ap <= 0, last iterate kept
    NONFINITE = 3              #: stopped on a non-finite p'Ap, last iterate kept

    @property
    def description(self) -> str:
        """How a task with this outcome ended, for summaries."""
        return _CG_STATE_DESCRIPTIONS[self]


_CG_STATE_DESCRIPTIONS = {
    CGState.RUNNING: "max_iter reached", CGState.CONVERGED: "converged",
    CGState.NONPOSITIVE_CURVATURE: "stopped: pᵀAp ≤ 0",
    CGState.NONFINITE: "stopped: non-finite pᵀAp"}

_FLOATING = (torch.float32, torch.float64)


# ---------------------------------------------------------------------------
# Argument checks: csrc/checks.h's rules, order and wording, for the reference
# and fake kernels (tests/test_ops.py feeds every bad input to both paths).


class _Args:
    """Checks the tensors of one call against a reference [T, P] tensor
    (csrc/checks.h's ArgChecker). ``data=False`` (fake and meta tensors) skips
    the memory-sharing checks, which need real storage."""

    def __init__(self, op: str, ref_name: str, ref: torch.Tensor, data: bool = True):
        self.op, self.ref_name, self.ref, self.data = op, ref_name, ref, data
        if ref.dim() != 2:
            raise ValueError(
                f"{op}: {ref_name} must be a 2-D [T, P] tensor, got shape {list(ref.shape)} "
                "(flatten the parameters of each task into one row)")
        if ref.dtype not in _FLOATING:
            raise ValueError(
                f"{op}: unsupported dtype {ref.dtype} for {ref_name}; use float32 or float64")
        self._common(ref_name, ref)

    def rows(self, name: str, t: torch.Tensor) -> None:
        """Another [T, P] tensor: same shape and dtype as the reference."""
        self._same_dtype(name, t)
        if t.shape != self.ref.shape:
            raise ValueError(
                f"{self.op}: {name} has shape {list(t.shape)} but {self.ref_name} has shape "
                f"{list(self.ref.shape)}; all [T, P] inputs must have the same shape")
        self._common(name, t)

    def per_task(self, name: str, t: torch.Tensor) -> None:
        """A per-task [T] vector of the reference's dtype."""
        self._same_dtype(name, t)
        self._task_vector(name, t)

    def per_task_int32(self, name: str, t: torch.Tensor) -> None:
        """A per-task [T] int32 vector."""
        if t.dtype != torch.int32:
            raise ValueError(
                f"{self.op}: {name} must be int32 but has dtype {t.dtype} "
                "(create it with dtype=torch.int32)")
        self._task_vector(name, t)

    def distinct(self, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
        """a and b (one of them written by the op) must not share memory."""
        if self.data and _overlap(a, b):
            raise RuntimeError(
                f"{self.op}: {a_name} and {b_name} share memory; pass distinct tensors "
                "(e.g. use .clone())")

    def per_param(self, name: str, t: torch.Tensor) -> None:
        """A [P] vector broadcast over tasks."""
        self._same_dtype(name, t)
        self._vector(name, t, "P", self.ref.shape[1], "broadcast over tasks")

    def _same_dtype(self, name: str, t: torch.Tensor) -> None:
        if t.dtype != self.ref.dtype:
            raise ValueError(
                f"{self.op}: {name} has dtype {t.dtype} but {self.ref_name} has "
                f"{self.ref.dtype}; all floating inputs must share one dtype "
                f"(convert with .to({self.ref_name}.dtype))")

    def _task_vector(self, name: str, t: torch.Tensor) -> None:
        self._vector(name, t, "T", self.ref.shape[0], f"one entry per task of {self.ref_name}")

    def _vector(self, name: str, t: torch.Tensor, size_name: str, size: int, meaning: str) -> None:
        if t.dim() != 1 or t.shape[0] != size:
            raise ValueError(
                f"{self.op}: {name} must have shape [{size_name}] = [{size}] ({meaning}), "
                f"got {list(t.shape)}")
        self._common(name, t)

    def _common(self, name: str, t: torch.Tensor) -> None:
        if t.device != self.ref.device:
            raise ValueError(
                f"{self.op}: {name} is on {t.device} but {self.ref_name} is on "
                f"{self.ref.device}; move all inputs to one device")
        if not t.is_contiguous():
            raise ValueError(f"{self.op}: {name} must be contiguous (call .contiguous())")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether at::get_overlap_status(a, b) is Full or Partial, for the
    contiguous tensors the checks let through: the same tensor, or two
    non-empty views of one storage whose byte ranges intersect."""
    if a is b:
        return True
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _check_cg_step(x, r, p, Hp, rs, state, threshold_sq, a=None, b=None, *, data=True) -> None:
    c = _Args("cg_step_", "x", x, data)
    c.rows("r", r)
    c.rows("p", p)
    c.rows("Hp", Hp)
    c.per_task("rs", rs)
    c.per_task_int32("state", state)
    c.per_task("threshold_sq", threshold_sq)
    c.distinct("x", x, "r", r)
    c.distinct("x", x, "p", p)
    c.distinct("r", r, "p", p)
    c.distinct("Hp", Hp, "x", x)
    c.distinct("Hp", Hp, "r", r)
    c.distinct("Hp", Hp, "p", p)
    for name, t in (("x", x), ("r", r), ("p", p), ("Hp", Hp), ("state", state),
                    ("threshold_sq", threshold_sq)):
        c.distinct("rs", rs, name, t)
    for name, t in (("x", x), ("r", r), ("p", p), ("Hp", Hp), ("threshold_sq", threshold_sq)):
        c.distinct("state", state, name, t)
    for name, t in (("x", x), ("r", r), ("p", p)):
        c.distinct("threshold_sq", threshold_sq, name, t)


def _check_prox_sgd_step(phi, g, theta, lr=None, lam=None, max_norm=None, *, data=True) -> None:
    c = _Args("prox_sgd_step_", "phi", phi, data)
    c.rows("g", g)
    c.per_param("theta", theta)
    c.distinct("phi", phi, "g", g)
    c.distinct("phi", phi, "theta", theta)


def _check_adjoint_sgd_step(adj, Ha, g, lr_grad, lr=None, *, data=True) -> None:
    c = _Args("adjoint_sgd_step_", "adj", adj, data)
    c.rows("Ha", Ha)
    c.rows("g", g)
    c.per_task("lr_grad", lr_grad)
    c.distinct("adj", adj, "Ha", Ha)
    c.distinct("adj", adj, "g", g)
    for name, t in (("adj", adj), ("Ha", Ha), ("g", g)):
        c.distinct("lr_grad", lr_grad, name, t)


def _check_batched_dot(x, y, *, data=True) -> None:
    _Args("batched_dot", "x", x, data).rows("y", y)


def _check_batched_sq_norm(x, *, data=True) -> None:
    _Args("batched_sq_norm", "x", x, data)


# ---------------------------------------------------------------------------
# Pure-PyTorch references. Same semantics as the kernels; tasks a step leaves
# alone are left bitwise untouched (torch.where keeps the original values).
# Like the kernels, they accumulate every reduction in float64 (_row_sum) and
# work out the per-task scalars from those sums in float64.


def _row_sum(terms: torch.Tensor) -> torch.Tensor:
    """[T, P] -> [T] row sums, accumulated in float64 (whatever terms' dtype)."""
    return terms.sum(1, dtype=torch.float64)


def _ref_cg_step_(x, r, p, Hp, rs, state, threshold_sq, a: float, b: float) -> None:
    """One CG iteration on (a*I + b*H_t) x_t = rhs_t for tasks with state 0.

    x, r, p, Hp: [T, P] (Hp = H_t p_t); rs: [T], r_t'r_t; state: [T] int32;
    threshold_sq: [T]. See :func:`cg_step_`.
    """
    running = state == int(CGState.RUNNING)
    Ap = a * p + b * Hp
    pAp = _row_sum(p * Ap)
    finite = torch.isfinite(pAp)
    step = running & finite & (pAp > 0)
    step_rows = step.unsqueeze(1)
    alpha = (rs.double() / pAp).to(x.dtype).unsqueeze(1)
    x.copy_(torch.where(step_rows, x + alpha * p, x))
    r_new = torch.where(step_rows, r - alpha * Ap, r)
    rs_new = _row_sum(r_new * r_new)
    beta = (rs_new / rs.double()).to(x.dtype).unsqueeze(1)
    p.copy_(torch.where(step_rows, r_new + beta * p, p))
    r.copy_(r_new)
    new_state = torch.where(running & ~finite, int(CGState.NONFINITE), state)
    new_state = torch.where(running & finite & (pAp <= 0), int(CGState.NONPOSITIVE_CURVATURE), new_state)
    new_state = torch.where(step & (rs_new <= threshold_sq.double()), int(CGState.CONVERGED),
                            new_state)
    rs.copy_(torch.where(step, rs_new.to(rs.dtype), rs))
    state.copy_(new_state)


def _ref_prox_sgd_step_(phi, g, theta, lr: float, lam: float, max_norm: float = 0.0) -> None:
    """phi <- phi - lr*(scale_t*g + lam*(phi - theta)). See :func:`prox_sgd_step_`."""
    pull = lam * (phi - theta)
    if max_norm > 0:
        norm = _row_sum(g * g).sqrt()
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0).to(g.dtype)
        step = scale.unsqueeze(1) * g + pull
    else:
        step = g + pull
    phi.sub_(lr * step)


def _ref_adjoint_sgd_step_(adj, Ha, g, lr_grad, lr: float) -> None:
    """lr_grad -= <g_t, adj_t>; adj <- adj - lr*Ha. See :func:`adjoint_sgd_step_`."""
    lr_grad.copy_(lr_grad.double() - _row_sum(g * adj))
    adj.sub_(lr * Ha)


def _ref_batched_dot(x, y) -> torch.Tensor:
    """[T, P] x [T, P] -> [T] per-task inner products."""
    return _row_sum(x * y).to(x.dtype)


def _ref_batched_sq_norm(x) -> torch.Tensor:
    """[T, P] -> [T] per-task squared Euclidean norms."""
    return _row_sum(x * x).to(x.dtype)


#: The pure-PyTorch reference implementations, by op name (no argument checks:
#: the registered reference kernels check first).
reference = types.SimpleNamespace(
    cg_step_=_ref_cg_step_,
    prox_sgd_step_=_ref_prox_sgd_step_,
    adjoint_sgd_step_=_ref_adjoint_sgd_step_,
    batched_dot=_ref_batched_dot,
    batched_sq_norm=_ref_batched_sq_norm,
)


# ---------------------------------------------------------------------------
# Autograd of the reductions (the same on the compiled and the reference path).


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _batched_dot_backward(ctx, grad):
    x, y = ctx.saved_tensors
    grad = grad.unsqueeze(1)
    return grad * y, grad * x


def _batched_sq_norm_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return 2 * grad.unsqueeze(1) * x


# ---------------------------------------------------------------------------
# The operators: one declaration each.


def _per_task_result(x, *args):
    return x.new_empty(x.shape[:1])


@dataclasses.dataclass(frozen=True)
class _Op:
    schema: str                      #: arguments and result, in the dispatcher's schema language
    check: Callable[..., None]       #: argument rules (csrc/checks.h)
    result: Optional[Callable] = None  #: output metadata for fake tensors (None: returns ())
    backward: Optional[Callable] = None  #: autograd formula, for differentiable ops


# Shapes: x, r, p, Hp, phi, g, adj, Ha, y: [T, P]; rs, state, threshold_sq,
# lr_grad: [T]; theta: [P]. The contracts are in the public functions below.
_OPS = {
    "cg_step_": _Op(
        "(Tensor(a!) x, Tensor(b!) r, Tensor(c!) p, Tensor Hp, Tensor(d!) rs, "
        "Tensor(e!) state, Tensor threshold_sq, float a, float b) -> ()", _check_cg_step),
    "prox_sgd_step_": _Op(
        "(Tensor(a!) phi, Tensor g, Tensor theta, float lr, float lam, float max_norm) -> ()",
        _check_prox_sgd_step),
    "adjoint_sgd_step_": _Op(
        "(Tensor(a!) adj, Tensor Ha, Tensor g, Tensor(b!) lr_grad, float lr) -> ()",
        _check_adjoint_sgd_step),
    "batched_dot": _Op("(Tensor x, Tensor y) -> Tensor", _check_batched_dot,
                       _per_task_result, _batched_dot_backward),
    "batched_sq_norm": _Op("(Tensor x) -> Tensor", _check_batched_sq_norm,
                           _per_task_result, _batched_sq_norm_backward),
}

_NAMESPACE = "imaml_ext"
_DEVICE_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _fake_kernel(op: _Op):
    def fake(*args):
        op.check(*args, data=False)
        return op.result(*args) if op.result else None
    return fake


def _reference_kernel(name: str, op: _Op):
    ref = getattr(reference, name)

    def kernel(*args):
        op.check(*args)
        return ref(*args)
    return kernel


def _loading_kernel(name: str):
    """Serves a device before any kernel is registered for it: loads the
    kernels (compiled, else the reference ones), then dispatches again."""
    def kernel(*args):
        if _install_kernels():
            return getattr(torch.ops.imaml_ext, name).default(*args)
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        raise NotImplementedError(
            f"imaml_ext::{name} has no kernel for {device.type} tensors "
            f"(kernels: CPU, CUDA; backend: {_build.backend()})")
    return kernel


_library = torch.library.Library(_NAMESPACE, "DEF")
for _name, _op in _OPS.items():
    _library.define(_name + _op.schema)
    torch.library.register_fake(f"{_NAMESPACE}::{_name}", _fake_kernel(_op), lib=_library)
    _library.impl(_name, _loading_kernel(_name), "CompositeExplicitAutograd")
    if _op.backward is not None:
        torch.library.register_autograd(f"{_NAMESPACE}::{_name}", _op.backward,
                                        setup_context=_save_inputs, lib=_library)
del _name, _op


def _register_reference(dispatch_keys) -> torch.library.Library:
    """Registers the reference kernels for these dispatch keys; they stay until
    the returned library is destroyed."""
    lib = torch.library.Library(_NAMESPACE, "IMPL")
    for key in dispatch_keys:
        for name, op in _OPS.items():
            lib.impl(name, _reference_kernel(name, op), key)
    return lib


_install_lock = threading.RLock()
_fallback_library: Optional[torch.library.Library] = None


def _install_kernels() -> bool:
    """Loads the compiled kernels and registers the reference ones for the
    devices they leave out. True the first time, False once done."""
    global _fallback_library
    with _install_lock:
        if _fallback_library is not None:
            return False
        b = _build.backend()
        served = {"cpu": b.cpu, "cuda": b.cuda}
        _fallback_library = _register_reference(
            key for device, key in _DEVICE_KEYS.items() if not served[device])
        return True


@contextlib.contextmanager
def use_reference() -> Iterator[None]:
    """Runs the PyTorch reference kernels instead of the compiled ones inside
    the ``with`` block, for an in-process A/B (benchmarks/bench_imaml_ops_ab.py)::

        with imaml_ext.ops.use_reference():
            ...  # every imaml_ext op runs its reference kernel
    """
    _install_kernels()
    b = _build.backend()
    served = {"cpu": b.cpu, "cuda": b.cuda}
    lib = _register_reference(key for device, key in _DEVICE_KEYS.items() if served[device])
    try:
        yield
    finally:
        lib._destroy()


# ---------------------------------------------------------------------------
# Public ops.


def cg_step_(x, r, p, Hp, rs, state, threshold_sq, a: float, b: float) -> None:
    """One conjugate-gradient iteration for T systems (a*I + b*H_t) x_t = rhs_t.

    x, r, p, Hp: [T, P] iterate, residual, direction and Hp_t = H_t p_t;
    rs: [T] current r_t'r_t; state: [T] int32 (:class:`CGState`);
    threshold_sq: [T]. For every task with ``state[t] == RUNNING``::

        Ap = a*p + b*Hp;  pAp = <p, Ap>
        pAp not finite -> state = NONFINITE, task unchanged
        pAp <= 0       -> state = NONPOSITIVE_CURVATURE, task unchanged
        alpha = rs/pAp;  x += alpha*p;  r -= alpha*Ap;  rs_new = <r, r>
        p = r + (rs_new/rs)*p;  rs = rs_new;  rs_new <= threshold_sq -> state = CONVERGED

    Tasks in another state are left untouched. x, r, p, rs and state are
    updated in place.
    """
    torch.ops.imaml_ext.cg_step_.default(x, r, p, Hp, rs, state, threshold_sq, a, b)


def prox_sgd_step_(phi, g, theta, lr: float, lam: float, max_norm: float = 0.0) -> None:
    """Proximal SGD step on every task's parameters, in place.

    phi, g: [T, P]; theta: [P] (broadcast over tasks)::

        scale_t = min(1, max_norm / (||g_t|| + 1e-6)) if max_norm > 0 else 1
        phi_t <- phi_t - lr*(scale_t*g_t + lam*(phi_t - theta))
    """
    torch.ops.imaml_ext.prox_sgd_step_.default(phi, g, theta, lr, lam, max_norm)


def adjoint_sgd_step_(adj, Ha, g, lr_grad, lr: float) -> None:
    """Reverse of the SGD step phi_{k+1} = phi_k - lr*g_k, in place.

    adj, Ha, g: [T, P] (Ha = H_t adj_t); lr_grad: [T]::

        lr_grad_t -= <g_t, adj_t>   (adj before the update)
        adj_t     <- adj_t - lr*Ha_t
    """
    torch.ops.imaml_ext.adjoint_sgd_step_.default(adj, Ha, g, lr_grad, lr)


def batched_dot(x, y) -> torch.Tensor:
    """Per-task inner products: [T, P] x [T, P] -> [T]. Differentiable."""
    return torch.ops.imaml_ext.batched_dot.default(x, y)


def batched_sq_norm(x) -> torch.Tensor:
    """Per-task squared Euclidean norms: [T, P] -> [T]. Differentiable."""
    return torch.ops.imaml_ext.batched_sq_norm.default(x)
