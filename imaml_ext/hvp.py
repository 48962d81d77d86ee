"""Batched Hessian-vector products of per-task losses.

For T independent tasks with losses f(φ_t; x_t, y_t), ``make_hvp`` returns a
function v ↦ [H_1 v_1, ..., H_T v_T] (``[T, P] -> [T, P]``), where H_t is the
Hessian of task t's loss with respect to its own parameters at φ_t.

Two modes:

* ``"reverse"`` (reverse-over-reverse): the per-task gradient graph
  g(φ) = ∇ Σ_t f_t is built once; each product is one backward pass
  through it, ∇_φ ⟨g(φ), v⟩.  Because the tasks do not share parameters,
  ∇_φ ⟨g, v⟩ holds H_t v_t in row t.  Cheap per product, keeps the graph.
* ``"forward"`` (forward-over-reverse): ``jvp`` of ``grad`` per task, run
  over the tasks with ``vmap`` (or a loop), with no retained graph; each
  product re-runs forward and backward.

Either way ``f`` runs over the tasks as ``batching`` says (``"vmap"`` or
``"loop"``, :mod:`imaml_ext.batching`).

``"auto"`` picks :func:`default_mode` for the device type of φ, or
``"forward"`` inside a ``torch.func`` transform (``grad``, ``vjp``, ...
taken over :func:`imaml_ext.imaml`), where the reverse mode's
``requires_grad_`` is not allowed.

In place of H, :func:`make_curvature` can return the Gauss–Newton matrix
G_t = J_tᵀ ∇²_z ℓ_t J_t (:func:`make_gnvp`; the names are :data:`CURVATURES`).
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple, Union

import torch
from torch.func import grad, jvp, vjp

from .batching import over_tasks, under_transform

__all__ = ["make_hvp", "hvp", "grad_and_hvp", "HVP_MODES", "DEFAULT_MODES", "default_mode", "make_gnvp", "make_curvature",
           "CURVATURES"]

HVP_MODES = ("reverse", "forward")
PerTaskLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Matvec = Callable[[torch.Tensor], torch.Tensor]


# The HVP mode "auto" picks, per device type.  CPU: "reverse" is measured
# faster (benchmarks/RESULTS.md, bench_hvp.py).  CUDA: not yet measured;
# "reverse" until ``bench_hvp.py --device cuda`` says otherwise.
DEFAULT_MODES: Dict[str, str] = {"cpu": "reverse", "cuda": "reverse"}
FALLBACK_MODE = "reverse"


def default_mode(device: Union[torch.device, str]) -> str:
    """The HVP mode ``"auto"`` means on ``device`` (a ``torch.device`` or a
    string such as ``"cuda:0"``): its type's entry in :data:`DEFAULT_MODES`,
    ``"reverse"`` for a type not listed there."""
    return DEFAULT_MODES.get(torch.device(device).type, FALLBACK_MODE)


def grad_and_hvp(f: PerTaskLoss, phi, x, y, batching: str = "vmap") -> Tuple[torch.Tensor, Matvec]:
    """The per-task gradients ``[T, P]`` at ``phi`` (detached) and the reverse-mode
    ``matvec`` that reuses their graph: one forward and backward pass for both."""
    g, matvec = _reverse_graph(f, phi, x, y, batching)
    return (torch.zeros_like(phi) if g is None else g.detach()), matvec


def _reverse(f: PerTaskLoss, phi, x, y, batching: str) -> Matvec:
    return _reverse_graph(f, phi, x, y, batching)[1]


def _reverse_graph(f: PerTaskLoss, phi, x, y, batching: str):
    with torch.enable_grad():
        p = phi.detach().requires_grad_(True)
        total = over_tasks(f, batching)(p, x, y).sum()
        (g,) = torch.autograd.grad(total, p, create_graph=True, allow_unused=True)
    if g is None or not g.requires_grad:
        # The loss is affine in φ: its Hessian is zero.
        return g, torch.zeros_like

    def matvec(v: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            (hv,) = torch.autograd.grad(g, p, grad_outputs=v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if hv is None else hv

    return g, matvec


def _forward(f: PerTaskLoss, phi, x, y, batching: str) -> Matvec:
    phi = phi.detach()
    grad_f = grad(f)

    def one_task(p, v, x_t, y_t):
        return jvp(lambda q: grad_f(q, x_t, y_t), (p,), (v,))[1]

    batched = over_tasks(one_task, batching)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        try:
            return batched(phi, v, x, y)
        except RuntimeError as e:
            # Some losses' backward formulas (F.mse_loss's, for one) have no
            # forward-mode derivative and fail with this PyTorch message.
            if "ZeroTensors are immutable" not in str(e):
                raise
            raise RuntimeError(
                "forward-over-reverse HVP is not supported by this loss_fn's backward in PyTorch "
                f"({e}); use hvp_mode='reverse', or write the loss from elementary ops, "
                "e.g. ((out - y) ** 2).mean() instead of F.mse_loss") from e

    return matvec


def make_hvp(f: PerTaskLoss, phi: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
             mode: str = "auto", batching: str = "vmap") -> Matvec:
    """Batched Hessian-vector product at ``phi``.

    Args:
        f: per-task loss ``f(phi_t [P], x_t, y_t) -> scalar``, a pure function.
        phi: ``[T, P]`` point at which the Hessians are taken.
        x, y: per-task data, leading dimension T.
        mode: ``"reverse"``, ``"forward"`` or ``"auto"`` (module docstring).
        batching: how ``f`` runs over the tasks, ``"vmap"`` or ``"loop"``
            (:mod:`imaml_ext.batching`).

    Returns:
        ``matvec(v [T, P]) -> [T, P]`` with row t equal to H_t v_t.
    """
    if phi.dim() != 2:
        raise ValueError(f"phi must be [T, P], got shape {tuple(phi.shape)}")
    transformed = under_transform(phi)
    if mode == "auto":
        mode = "forward" if transformed else default_mode(phi.device)
    if mode == "reverse":
        if transformed:
            raise ValueError("hvp_mode='reverse' cannot run inside a torch.func transform (it needs "
                             "requires_grad_); use hvp_mode='forward' or 'auto'")
        return _reverse(f, phi, x, y, batching)
    if mode == "forward":
        return _forward(f, phi, x, y, batching)
    raise ValueError(f"unknown HVP mode {mode!r}; choose one of {HVP_MODES + ('auto',)}")


def hvp(f: PerTaskLoss, phi: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
        v: torch.Tensor, mode: str = "auto", batching: str = "vmap") -> torch.Tensor:
    """One batched Hessian-vector product ``[T, P]`` (see :func:`make_hvp`)."""
    return make_hvp(f, phi, x, y, mode, batching)(v)


#: Curvature matrices the implicit backward and the Hessian-free inner solver
#: can use in place of "H": the Hessian of the support loss, or its
#: Gauss–Newton approximation (:func:`make_gnvp`).
CURVATURES = ("hessian", "gauss_newton")


def make_gnvp(model_fn: Callable, loss_fn: Callable, phi: torch.Tensor, x: torch.Tensor,
              y: torch.Tensor, batching: str = "vmap") -> Matvec:
    """Batched Gauss–Newton products at ``phi``.

    With z_t(φ) = ``model_fn(φ, x_t)`` the model's outputs and
    ℓ_t(z) = ``loss_fn(z, y_t)``, the Hessian of the loss splits as

        ∇²(ℓ_t ∘ z_t) = J_tᵀ ∇²_z ℓ_t J_t + Σ_i ∂ℓ_t/∂z_i ∇²z_i,   J_t = ∂z_t/∂φ,

    and the Gauss–Newton matrix G_t keeps the first term.  G_t ⪰ 0 whenever ℓ
    is convex in z (cross-entropy, MSE), so I + G_t/λ is positive definite
    and CG on it is always a solve.  Each product is J v (forward mode, one
    ``jvp`` through the model), ∇²_z ℓ·(J v) (reverse-over-reverse on the
    loss alone) and Jᵀ(·) (one ``vjp`` through the model).

    Args:
        model_fn: ``(phi_t [P], x_t) -> z_t``, one task's outputs, a pure function.
        loss_fn: ``(z_t, y_t) -> scalar``.
        phi: ``[T, P]`` point; x, y: per-task data, leading dimension T.
        batching: how the tasks run, ``"vmap"`` or ``"loop"`` (:func:`~imaml_ext.batching.over_tasks`).

    Returns:
        ``matvec(v [T, P]) -> [T, P]`` with row t equal to G_t v_t.
    """
    if phi.dim() != 2:
        raise ValueError(f"phi must be [T, P], got shape {tuple(phi.shape)}")
    phi = phi.detach()

    def one_task(p, v, x_t, y_t):
        def outputs(q):
            return model_fn(q, x_t)

        z, jv = jvp(outputs, (p,), (v,))
        _, loss_hvp = vjp(grad(lambda zz: loss_fn(zz, y_t)), z)
        (hz_jv,) = loss_hvp(jv)  # ∇²_z ℓ is symmetric: its vjp is its product
        _, pullback = vjp(outputs, p)
        return pullback(hz_jv)[0]

    batched = over_tasks(one_task, batching)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return batched(phi, v, x, y)

    return matvec


def make_curvature(task_loss, phi: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                   curvature: str = "hessian", mode: str = "auto") -> Matvec:
    """Batched products with each task's curvature matrix at ``phi`` [T, P]:
    the Hessian H_t (:func:`make_hvp`, in HVP ``mode``) or the Gauss–Newton
    matrix G_t (:func:`make_gnvp`), by name (:data:`CURVATURES`).
    ``task_loss`` is an :class:`~imaml_ext.functional.TaskLoss`."""
    if curvature == "hessian":
        return make_hvp(task_loss.per_task, phi, x, y, mode, task_loss.batching)
    if curvature == "gauss_newton":
        return make_gnvp(task_loss.per_task_outputs, task_loss.loss_fn, phi, x, y, task_loss.batching)
    raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
