"""Fused ops over flat [T, P] buffers (T tasks, P parameters per task).

Each op runs the compiled kernel (``torch.ops.imaml_ext.*``, see csrc/) when
the extension is loaded for the tensors' device, and otherwise the pure-PyTorch
reference of the same name in :data:`reference`, which has identical semantics.
:func:`imaml_ext._build.backend` says which one runs and why.

All tensors of one call live on one device and share one floating dtype
(float32 or float64; ``state`` is int32); all are contiguous. Mutating ops
(trailing underscore) write their outputs in place and return ``None``; a
tensor an op writes must not share memory with its other [T, P] inputs (the
compiled kernels reject that). None of the ops synchronises with the host.
"""

from __future__ import annotations

import enum
import types

import torch

from . import _build

__all__ = [
    "cg_step_",
    "prox_sgd_step_",
    "adjoint_sgd_step_",
    "batched_dot",
    "batched_sq_norm",
    "reference",
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
# Argument checks: the rules and wording of csrc/checks.h, raised as ValueError.


class _Args:
    """Checks the tensors of one call against a reference [T, P] tensor."""

    def __init__(self, op: str, ref_name: str, ref: torch.Tensor):
        self.op, self.ref_name, self.ref = op, ref_name, ref
        if not isinstance(ref, torch.Tensor) or ref.dim() != 2:
            shape = list(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
            raise ValueError(
                f"{op}: {ref_name} must be a 2-D [T, P] tensor, got shape {shape} "
                "(flatten the parameters of each task into one row)")
        if ref.dtype not in _FLOATING:
            raise ValueError(
                f"{op}: unsupported dtype {ref.dtype} for {ref_name}; use float32 or float64")
        self._common(ref_name, ref)

    def rows(self, name: str, t: torch.Tensor) -> None:
        self._same_dtype(name, t)
        if t.shape != self.ref.shape:
            raise ValueError(
                f"{self.op}: {name} has shape {list(t.shape)} but {self.ref_name} has shape "
                f"{list(self.ref.shape)}; all [T, P] inputs must have the same shape")
        self._common(name, t)

    def per_task(self, name: str, t: torch.Tensor) -> None:
        self._same_dtype(name, t)
        self._task_vector(name, t)

    def per_task_int32(self, name: str, t: torch.Tensor) -> None:
        self._tensor(name, t)
        if t.dtype != torch.int32:
            raise ValueError(
                f"{self.op}: {name} must be int32 but has dtype {t.dtype} "
                "(create it with dtype=torch.int32)")
        self._task_vector(name, t)

    def per_param(self, name: str, t: torch.Tensor) -> None:
        self._same_dtype(name, t)
        self._vector(name, t, "P", self.ref.shape[1], "broadcast over tasks")

    def _tensor(self, name: str, t) -> None:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{self.op}: {name} must be a tensor, got {type(t).__name__}")

    def _same_dtype(self, name: str, t: torch.Tensor) -> None:
        self._tensor(name, t)
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


def _check_cg_step(x, r, p, Hp, rs, state, threshold_sq) -> None:
    c = _Args("cg_step_", "x", x)
    c.rows("r", r)
    c.rows("p", p)
    c.rows("Hp", Hp)
    c.per_task("rs", rs)
    c.per_task_int32("state", state)
    c.per_task("threshold_sq", threshold_sq)


def _check_prox_sgd_step(phi, g, theta) -> None:
    c = _Args("prox_sgd_step_", "phi", phi)
    c.rows("g", g)
    c.per_param("theta", theta)


def _check_adjoint_sgd_step(adj, Ha, g, lr_grad) -> None:
    c = _Args("adjoint_sgd_step_", "adj", adj)
    c.rows("Ha", Ha)
    c.rows("g", g)
    c.per_task("lr_grad", lr_grad)


# ---------------------------------------------------------------------------
# Pure-PyTorch references. Same semantics as the kernels; tasks a step leaves
# alone are left bitwise untouched (torch.where keeps the original values).


def _ref_cg_step_(x, r, p, Hp, rs, state, threshold_sq, a: float, b: float) -> None:
    """One CG iteration on (a*I + b*H_t) x_t = rhs_t for tasks with state 0.

    x, r, p, Hp: [T, P] (Hp = H_t p_t); rs: [T], r_t'r_t; state: [T] int32;
    threshold_sq: [T]. See :func:`cg_step_`.
    """
    running = state == CGState.RUNNING
    Ap = a * p + b * Hp
    pAp = (p * Ap).sum(1)
    finite = torch.isfinite(pAp)
    step = running & finite & (pAp > 0)
    step_rows = step.unsqueeze(1)
    alpha = (rs / pAp).unsqueeze(1)
    x.copy_(torch.where(step_rows, x + alpha * p, x))
    r_new = torch.where(step_rows, r - alpha * Ap, r)
    rs_new = (r_new * r_new).sum(1)
    p.copy_(torch.where(step_rows, r_new + (rs_new / rs).unsqueeze(1) * p, p))
    r.copy_(r_new)
    new_state = torch.where(running & ~finite, int(CGState.NONFINITE), state)
    new_state = torch.where(running & finite & (pAp <= 0), int(CGState.NONPOSITIVE_CURVATURE), new_state)
    new_state = torch.where(step & (rs_new <= threshold_sq), int(CGState.CONVERGED), new_state)
    rs.copy_(torch.where(step, rs_new, rs))
    state.copy_(new_state)


def _ref_prox_sgd_step_(phi, g, theta, lr: float, lam: float, max_norm: float = 0.0) -> None:
    """phi <- phi - lr*(scale_t*g + lam*(phi - theta)). See :func:`prox_sgd_step_`."""
    pull = lam * (phi - theta)
    if max_norm > 0:
        norm = (g * g).sum(1).sqrt()
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        step = scale.unsqueeze(1) * g + pull
    else:
        step = g + pull
    phi.sub_(lr * step)


def _ref_adjoint_sgd_step_(adj, Ha, g, lr_grad, lr: float) -> None:
    """lr_grad -= <g_t, adj_t>; adj <- adj - lr*Ha. See :func:`adjoint_sgd_step_`."""
    lr_grad.sub_((g * adj).sum(1))
    adj.sub_(lr * Ha)


def _ref_batched_dot(x, y) -> torch.Tensor:
    """[T, P] x [T, P] -> [T] per-task inner products."""
    return (x * y).sum(1)


def _ref_batched_sq_norm(x) -> torch.Tensor:
    """[T, P] -> [T] per-task squared Euclidean norms."""
    return (x * x).sum(1)


#: The pure-PyTorch reference implementations, by op name.
reference = types.SimpleNamespace(
    cg_step_=_ref_cg_step_,
    prox_sgd_step_=_ref_prox_sgd_step_,
    adjoint_sgd_step_=_ref_adjoint_sgd_step_,
    batched_dot=_ref_batched_dot,
    batched_sq_norm=_ref_batched_sq_norm,
)


# ---------------------------------------------------------------------------
# Public ops.


def _compiled(device: torch.device) -> bool:
    b = _build.backend()
    return (b.cpu and device.type == "cpu") or (b.cuda and device.type == "cuda")


def cg_step_(x, r, p, Hp, rs, state, threshold_sq, a: float, b: float) -> None:
    """One conjugate-gradient iteration for T systems (a*I + b*H_t) x_t = rhs_t.

    x, r, p, Hp: [T, P] iterate, residual, direction and Hp_t = H_t p_t;
    rs: [T] current r_t'r_t; state: [T] int32; threshold_sq: [T]. For every
    task with ``state[t] == 0``::

        Ap = a*p + b*Hp;  pAp = <p, Ap>
        pAp not finite -> state = 3, task unchanged
        pAp <= 0       -> state = 2, task unchanged
        alpha = rs/pAp;  x += alpha*p;  r -= alpha*Ap;  rs_new = <r, r>
        p = r + (rs_new/rs)*p;  rs = rs_new;  rs_new <= threshold_sq -> state = 1

    Tasks with ``state[t] != 0`` are left untouched. x, r, p, rs and state
    are updated in place.
    """
    _check_cg_step(x, r, p, Hp, rs, state, threshold_sq)
    if _compiled(x.device):
        torch.ops.imaml_ext.cg_step_.default(x, r, p, Hp, rs, state, threshold_sq, a, b)
    else:
        _ref_cg_step_(x, r, p, Hp, rs, state, threshold_sq, a, b)


def prox_sgd_step_(phi, g, theta, lr: float, lam: float, max_norm: float = 0.0) -> None:
    """Proximal SGD step on every task's parameters, in place.

    phi, g: [T, P]; theta: [P] (broadcast over tasks)::

        scale_t = min(1, max_norm / (||g_t|| + 1e-6)) if max_norm > 0 else 1
        phi_t <- phi_t - lr*(scale_t*g_t + lam*(phi_t - theta))
    """
    _check_prox_sgd_step(phi, g, theta)
    if _compiled(phi.device):
        torch.ops.imaml_ext.prox_sgd_step_.default(phi, g, theta, lr, lam, max_norm)
    else:
        _ref_prox_sgd_step_(phi, g, theta, lr, lam, max_norm)


def adjoint_sgd_step_(adj, Ha, g, lr_grad, lr: float) -> None:
    """Reverse of the SGD step phi_{k+1} = phi_k - lr*g_k, in place.

    adj, Ha, g: [T, P] (Ha = H_t adj_t); lr_grad: [T]::

        lr_grad_t -= <g_t, adj_t>   (adj before the update)
        adj_t     <- adj_t - lr*Ha_t
    """
    _check_adjoint_sgd_step(adj, Ha, g, lr_grad)
    if _compiled(adj.device):
        torch.ops.imaml_ext.adjoint_sgd_step_.default(adj, Ha, g, lr_grad, lr)
    else:
        _ref_adjoint_sgd_step_(adj, Ha, g, lr_grad, lr)


def batched_dot(x, y) -> torch.Tensor:
    """Per-task inner products: [T, P] x [T, P] -> [T]."""
    c = _Args("batched_dot", "x", x)
    c.rows("y", y)
    if _compiled(x.device):
        return torch.ops.imaml_ext.batched_dot.default(x, y)
    return _ref_batched_dot(x, y)


def batched_sq_norm(x) -> torch.Tensor:
    """Per-task squared Euclidean norms: [T, P] -> [T]."""
    _Args("batched_sq_norm", "x", x)
    if _compiled(x.device):
        return torch.ops.imaml_ext.batched_sq_norm.default(x)
    return _ref_batched_sq_norm(x)


# ---------------------------------------------------------------------------
# Fake (meta) kernels, registered by _build once the op definitions are loaded.


_fakes_registered = False


def _register_fakes() -> None:
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True

    @torch.library.register_fake("imaml_ext::cg_step_")
    def _(x, r, p, Hp, rs, state, threshold_sq, a, b):
        return None

    @torch.library.register_fake("imaml_ext::prox_sgd_step_")
    def _(phi, g, theta, lr, lam, max_norm):
        return None

    @torch.library.register_fake("imaml_ext::adjoint_sgd_step_")
    def _(adj, Ha, g, lr_grad, lr):
        return None

    @torch.library.register_fake("imaml_ext::batched_dot")
    def _(x, y):
        torch._check(x.shape == y.shape, lambda: "batched_dot: x and y must have one shape")
        return x.new_empty(x.shape[:1])

    @torch.library.register_fake("imaml_ext::batched_sq_norm")
    def _(x):
        return x.new_empty(x.shape[:1])
