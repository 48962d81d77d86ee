"""Implicit MAML (Rajeswaran et al., 2019) as a ``torch.autograd.Function``.

Forward: solve every task's inner problem (:mod:`imaml_ext.inner`) with no
graph, returning φ* ``[T, P]``.  Backward: by the implicit function theorem
(the paper's Lemma 1), dφ_t*/dθ = (I + H_t/λ)⁻¹ with H_t = ∇²L̂_t(φ_t*),
which is symmetric, so the meta-gradient is

    ∂L/∂θ = Σ_t A_t⁻¹ ∂L/∂φ_t,   A_t = a·I + b·H_t   (a = 1, b = 1/λ),

with each A_t⁻¹ applied by a linear solver from x₀ = 0: batched conjugate
gradient by default, or any ``(matvec, rhs) -> x`` (:mod:`imaml_ext.solvers`),
as in JAXopt's and TorchOpt's implicit differentiation: the Function only
builds the operator A (one batched HVP per product) and hands it to the
solver.  Memory does not depend on the number of inner steps.

The Function is written in the ``setup_context`` form, so ``torch.func.grad``
and ``torch.func.vjp`` can be taken through :func:`imaml` when the model's
parameters are supplied with ``torch.func.functional_call`` (tested against
``.backward()`` in float64); inside such a transform ``hvp_mode="auto"``
uses the forward-over-reverse HVP.  It has no vmap rule: the inner loop
checks for non-finite losses on the host, which ``vmap`` does not allow.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import diagnostics, inner
from .adapted import Adapted, task_chunks
from .functional import TaskLoss
from .hvp import CURVATURES, HVP_MODES, make_curvature
from .solvers import (CG, IMAML_DEV_RESIDUAL_TOL, CGResult, CGState, ImamlDevCG, Matvec,
                      ShiftedOperator)
from .validation import (INNER_LR_RULE, check_batching, check_nonnegative, check_positive,
                         check_steps, check_task_batch, optional_positive)

__all__ = ["imaml", "INNER_SOLVERS", "LinearSolver"]

INNER_SOLVERS = ("gd", "hf", "nesterov")
COMPAT_MODES = (None, "imaml_dev")
LinearSolver = Callable[[Matvec, torch.Tensor], object]
_CG_STEPS_DEFAULT = 5


@dataclass
class _ImplicitSystem:
    """What the backward pass needs: the support data and loss for the HVP,
    the operator A = a·I + b·H, the linear solver and where to record its result."""

    task_loss: TaskLoss
    x: torch.Tensor
    y: torch.Tensor
    a: float
    b: float
    hvp_mode: str
    solver: LinearSolver
    info: Dict[str, object]
    curvature: str
    chunks: List[slice]  # the tasks, solved one slice at a time (task_chunk)

    def solve(self, phi: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """A_t⁻¹ rhs_t for every task, at φ* ``[T, P]``, one chunk of tasks at a time
        (one HVP graph per chunk); records the solver's result and the
        diagnostics (:mod:`imaml_ext.diagnostics`), warning if they are bad."""
        if len(self.chunks) == 1:
            result = self.solve_chunk(phi, self.x, self.y, rhs)
        else:
            result = self._solve_chunks(phi, rhs)
        x = self.solution(result, rhs)
        self.record(result)
        return x

    def solve_chunk(self, phi: torch.Tensor, x: torch.Tensor, y: torch.Tensor, rhs: torch.Tensor) -> object:
        """The linear solver's result for the tasks of ``phi`` ``[t, P]``."""
        matvec = make_curvature(self.task_loss, phi, x, y, self.curvature, self.hvp_mode)
        return self.solver(ShiftedOperator(matvec, self.a, self.b), rhs)

    @staticmethod
    def solution(result: object, rhs: torch.Tensor) -> torch.Tensor:
        """The solution ``[t, P]`` in a solver's ``result``, checked against ``rhs``."""
        x = result if isinstance(result, torch.Tensor) else getattr(result, "x", None)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"linear_solver must return the solution [T, P] or an object with it as "
                            f".x; got {type(result).__name__}")
        if x.shape != rhs.shape:
            raise ValueError(f"linear_solver returned shape {tuple(x.shape)}, expected [T, P] = "
                             f"{tuple(rhs.shape)}")
        if isinstance(result, CGResult):
            # A task whose CG met a non-finite value (a NaN query gradient, say)
            # contributes NaN, as a differentiated loop would: never a silent 0.
            x = torch.where((result.state == CGState.NONFINITE)[:, None], torch.nan, x)
        return x

    def record(self, result: object) -> None:
        """The solver's result (and CG's diagnostics) into ``info``; warns if they are bad."""
        self.info["linear_solve"] = result
        if isinstance(result, CGResult):
            self.info["cg"] = result
            diagnostics.record_cg(self.info, result)
        diagnostics.check(self.info)

    def _solve_chunks(self, phi: torch.Tensor, rhs: torch.Tensor) -> object:
        """The solve one chunk at a time, the solutions written into one ``[T, P]`` buffer."""
        out = torch.empty_like(rhs)
        results = []
        for c in self.chunks:
            r = self.solve_chunk(phi[c], self.x[c], self.y[c], rhs[c].contiguous())
            out[c] = r if isinstance(r, torch.Tensor) else r.x
            results.append(r if not isinstance(r, CGResult) else
                           dataclasses.replace(r, x=out[c]))  # the chunk's own copy is freed
        return _joined(results, out)


def _joined(results: List[object], x: Optional[torch.Tensor]) -> object:
    """The chunks' results as one: the solutions ``x`` ``[T, P]`` where all are tensors,
    a CGResult with solution ``x`` and the chunks' diagnostics joined, or (for other
    solvers) the list of the chunks' results."""
    if all(isinstance(r, torch.Tensor) for r in results):
        return x if x is not None else torch.cat(results)
    if all(isinstance(r, CGResult) for r in results):
        fields = [[getattr(r, f.name) for r in results] for f in dataclasses.fields(CGResult)[1:]]
        return CGResult(x, *(None if any(v is None for v in values) else torch.cat(values)
                             for values in fields))
    return _ChunkResults(results)


class _StreamedChunks:
    """The backward solves of one chunked ``adapted(x)`` / ``adapted.loss`` call, one
    chunk at a time as its query gradient arrives.  Each chunk's φ* comes from its
    own node (:class:`_ChunkMetaGrad`), made just before that chunk's query forward,
    so autograd runs it right after that chunk's backward (the nodes made last run
    first) and frees the chunk's gradient instead of holding every chunk's until a
    backward of the whole ``[T, P]``.  CG's solutions are summed, not kept
    (``info["cg"].x`` is None); the last chunk records the joined results."""

    def __init__(self, system: _ImplicitSystem, phi: torch.Tensor):
        self.system, self.phi = system, phi.detach()
        self.results: Dict[int, object] = {}

    def phi_of(self, theta: torch.Tensor, i: int) -> torch.Tensor:
        """φ* of chunk ``i`` ``[t, P]``, differentiable with respect to θ ``[P]``."""
        return _ChunkMetaGrad.apply(theta, self, i)

    def solve(self, i: int, rhs: torch.Tensor) -> torch.Tensor:
        """Σ over chunk ``i``'s tasks of A_t⁻¹ rhs_t ``[P]``."""
        system, c = self.system, self.system.chunks[i]
        result = system.solve_chunk(self.phi[c], system.x[c], system.y[c], rhs)
        x = system.solution(result, rhs)
        self.results[i] = dataclasses.replace(result, x=None) if isinstance(result, CGResult) else result
        if len(self.results) == len(system.chunks):
            system.record(_joined([self.results[k] for k in range(len(system.chunks))], None))
            self.results = {}  # a second backward (retain_graph) records afresh
        return x.sum(0)


class _ChunkMetaGrad(torch.autograd.Function):
    """theta [P] -> φ* of one chunk [t, P] (:class:`_StreamedChunks`)."""

    @staticmethod
    def forward(theta: torch.Tensor, chunks: _StreamedChunks, i: int) -> torch.Tensor:
        return chunks.phi[chunks.system.chunks[i]]

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.chunks, ctx.i = inputs[1], inputs[2]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_phi: torch.Tensor):
        return ctx.chunks.solve(ctx.i, grad_phi.contiguous()), None, None


class _ChunkResults(list):
    """The results of a user's solver, one per chunk of tasks; ``.x`` is their [T, P] solution."""

    @property
    def x(self) -> torch.Tensor:
        return torch.cat([r if isinstance(r, torch.Tensor) else r.x for r in self])


class _ImplicitMetaGrad(torch.autograd.Function):
    """theta [P] -> phi* [T, P]; backward applies Σ_t A_t⁻¹ to the incoming gradient."""

    @staticmethod
    def forward(theta: torch.Tensor, solve: Callable[[torch.Tensor], torch.Tensor],
                system: _ImplicitSystem) -> torch.Tensor:
        return solve(theta)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.system = inputs[2]
        ctx.save_for_backward(output)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_phi: torch.Tensor):
        (phi,) = ctx.saved_tensors
        return ctx.system.solve(phi, grad_phi.contiguous()).sum(0), None, None


def _linear_solver(linear_solver: Union[str, LinearSolver], cg_steps: int,
                   cg_tol: Optional[float], compat: Optional[str], num_tasks: int) -> LinearSolver:
    """``"cg"`` -> CG(cg_steps, cg_tol), or with ``compat="imaml_dev"`` the
    official code's CG for a meta-loss averaged over the tasks; a callable is
    used as it is."""
    if isinstance(linear_solver, str):
        if linear_solver != "cg":
            raise ValueError(f"linear_solver must be 'cg', a solver object such as "
                             f"imaml_ext.solvers.Neumann(steps=..., alpha=...), or a callable "
                             f"(matvec, rhs) -> x; got {linear_solver!r}")
        if compat != "imaml_dev":
            return CG(max_iter=cg_steps, tol=cg_tol)
        if cg_tol is not None:
            raise ValueError(f"compat='imaml_dev' stops CG as the official code does (a task once "
                             f"its rᵀr < {IMAML_DEV_RESIDUAL_TOL:g}); cg_tol applies without compat")
        return ImamlDevCG(max_iter=cg_steps, rhs_scale=1.0 / num_tasks)
    if isinstance(linear_solver, type):
        raise TypeError(f"linear_solver takes a solver object, not its class: pass "
                        f"{linear_solver.__name__}(...), e.g. imaml_ext.solvers.Neumann(steps=20, alpha=0.5)")
    if not callable(linear_solver):
        raise TypeError(f"linear_solver must be 'cg' or a callable (matvec, rhs) -> x, "
                        f"got {type(linear_solver).__name__}")
    if cg_steps != _CG_STEPS_DEFAULT or cg_tol is not None:
        raise ValueError("cg_steps and cg_tol configure linear_solver='cg'; with another "
                         "linear_solver, configure it instead (e.g. imaml_ext.solvers.CG(max_iter=..., tol=...))")
    return linear_solver


def imaml(model: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor,
          loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy, *,
          lam: float = 2.0, inner_steps: int = 16, inner_lr: float = 0.1,
          inner_solver: str = "gd", linear_solver: Union[str, LinearSolver] = "cg",
          cg_steps: int = _CG_STEPS_DEFAULT, cg_tol: Optional[float] = None,
          inner_cg_steps: int = 5, max_grad_norm: Optional[float] = None, hvp_mode: str = "auto",
          operator: Optional[tuple] = None, compat: Optional[str] = None,
          cg_damping: Optional[float] = None, curvature: str = "hessian",
          inner_tol: Optional[float] = None, inner_momentum: Optional[float] = None,
          task_chunk: Optional[int] = None, batching: str = "vmap") -> Adapted:
    """Adapt ``model`` to T tasks with iMAML; the result's backward yields the
    implicit meta-gradient on ``model``'s parameters.

    Args:
        model: any ``nn.Module``; its trainable parameters are θ (one dtype,
            one device).  Batch-norm must use batch statistics.
        support_x: ``[T, n, ...]`` support inputs, task dimension first.
        support_y: ``[T, n, ...]`` support targets.
        loss_fn: ``loss_fn(outputs [n, ...], targets [n, ...]) -> scalar``, one task.
        lam: λ > 0, strength of the proximal term (λ/2)‖φ − θ‖².
        inner_steps: GD steps (``"gd"``, ``"nesterov"``) or Newton steps (``"hf"``).
        inner_lr: GD step size > 0 (``"gd"``, ``"nesterov"`` and ``compat="imaml_dev"``); for no
            adaptation pass ``inner_steps=0`` (the same rule as :func:`~imaml_ext.maml`).
        inner_solver: ``"gd"``, ``"nesterov"`` (accelerated GD, same cost per
            step, fewer steps to a given residual) or ``"hf"`` (see
            :mod:`imaml_ext.inner`).
        linear_solver: how the backward pass solves A_t x_t = ∂L/∂φ_t:
            ``"cg"`` (batched CG configured by ``cg_steps``/``cg_tol``), a
            solver object from :mod:`imaml_ext.solvers` (``CG(max_iter, tol)``,
            ``Neumann(steps, alpha)``), or any callable
            ``(matvec, rhs) -> x`` where ``matvec`` applies A to ``[T, P]``
            and ``x`` is ``[T, P]`` (or an object with it as ``.x``).
        cg_steps: CG iterations of the backward solve (≥ 1), for ``"cg"``.
        cg_tol: relative residual at which a task's backward CG stops early;
            None: never early.  For ``"cg"``.
        inner_cg_steps: CG iterations per Newton step of ``"hf"``.
        max_grad_norm: clips each task's inner gradient to this global norm
            (``"gd"``); None: no clipping.
        hvp_mode: ``"reverse"``, ``"forward"`` or ``"auto"`` (:mod:`imaml_ext.hvp`).
        operator: ``(a, b)`` to solve with A = a·I + b·H instead of I + H/λ.
        compat: ``"imaml_dev"`` reproduces the meta-gradient of the official
            iMAML code (aravindr93/imaml_dev), which differs from the paper in
            four ways, all four reproduced: (1) the inner loop is plain GD on
            the unregularised L̂, then one pull-back step φ ← φ − α·λ(φ − θ);
            (2) the system is A = (1 + cg_damping)·I + H/(λ + 10) instead of
            I + H/λ; (3) CG stops a task once its rᵀr < 1e-10 (absolute),
            with no stop on pᵀAp ≤ 0 (:class:`~imaml_ext.solvers.ImamlDevCG`;
            ``cg_tol`` is refused); (4) ``cg_steps`` ≤ 1 means no solve: the
            query gradient as it is (``cg_steps=0`` is accepted only here).
            The official code averages the tasks' solutions, so the backward
            is assumed to start from a meta-loss that is the mean over the T
            tasks (the threshold of (3) is applied to T·∂L/∂φ_t).
            Within float64 rounding no difference remains
            (tests/test_imaml_dev_compat.py restates the official algorithm).
            Not covered: the official evaluation's character split, which
            differs from its training split; this project has one fixed split.
            Never the default; use it only to compare with that code.
        cg_damping: d in the ``"imaml_dev"`` operator (default 1.0, the
            official code's); only with ``compat="imaml_dev"``.
        curvature: the matrix H in A = a·I + b·H and in ``"hf"``'s Newton
            system: ``"hessian"`` (∇²L̂, the exact implicit Jacobian) or
            ``"gauss_newton"``, G = Jᵀ∇²_z ℓ J with z the model's outputs
            on the support set (:func:`~imaml_ext.hvp.make_gnvp`).  G ⪰ 0
            for losses convex in z (cross-entropy, MSE), so I + G/λ is
            positive definite and CG never stops on pᵀAp ≤ 0; the price is
            dropping Σ_i ∂ℓ/∂z_i ∇²z_i, which vanishes where the support
            outputs fit their targets (MSE) and is the part that makes H
            indefinite.
        inner_tol: relative stationarity residual ‖∇F(φ)‖/‖∇F(θ)‖ at which a
            task's inner solver stops moving it (per task, on the device);
            None: all ``inner_steps``.  Not with ``compat``.
        inner_momentum: β of ``"nesterov"``; None: (1 − √(λ·lr))/(1 + √(λ·lr))
            (:func:`~imaml_ext.inner.nesterov_momentum`).
        task_chunk: process the tasks ``task_chunk`` at a time (None: all at
            once): the inner solve, the backward solve (one HVP graph per
            chunk) and ``adapted(x)`` / ``adapted.loss`` (each chunk's forward
            recomputed in the backward pass instead of kept, and its backward
            solve run right after it), so that peak memory follows the chunk,
            not T (besides φ* ``[T, P]``; ``info["cg"].x`` is not kept).  The
            tasks are independent, so the meta-gradient is the unchunked one up
            to rounding; the price is one more forward pass of the query batch.
            A loss built from several ``adapted(x)`` / ``adapted.loss`` calls, or
            from one and ``adapted.flat`` / ``params``, has each part's systems
            solved on their own: the same up to rounding where the linear solver
            is linear in its right-hand side (CG to convergence, Neumann), not
            with CG stopped after ``cg_steps``: put the query terms in one call.
        batching: how the model runs over the tasks (:mod:`imaml_ext.batching`):
            ``"vmap"`` (one batched call; dropout draws per-task masks),
            ``"loop"`` (one call per task: any module, e.g. an LSTM, slower),
            ``"compiled"`` (``"vmap"`` with the inner steps compiled by
            ``torch.compile``: tens of seconds at the first call per model,
            shape and dtype, then faster; :mod:`imaml_ext.compiled`)
            or ``"auto"`` (``"vmap"`` or ``"loop"``, measured once per architecture and shape).

    Numbers may be Python, NumPy or 0-dim tensor scalars.
    An explicit ``cg_tol=0`` or ``max_grad_norm=0`` (the old spelling of
    "off") still means off, with a DeprecationWarning.

    Returns:
        :class:`~imaml_ext.adapted.Adapted`; ``adapted.info`` holds per-task
        diagnostics (:data:`imaml_ext.diagnostics.INFO_FIELDS`): after the
        forward the inner problem's stationarity residual (``"residual"``
        ``[T]``, relative to its value at θ, and ``"residual_norm"``,
        ``"residual_at_theta"``, ``"inner_steps_taken"``, all ``[T]``;
        not with ``compat="imaml_dev"``); after ``backward()``
        ``info["linear_solve"]``, what the linear solver returned (for CG a
        :class:`~imaml_ext.solvers.CGResult`, also under ``info["cg"]``,
        with ``"nonpositive_curvature"`` ``[T]`` bool and ``"min_rayleigh"``
        ``[T]``, the smallest pᵀAp/pᵀp CG met).  The backward raises
        :class:`~imaml_ext.diagnostics.ImplicitGradientWarning` (once per
        process) when the median relative residual exceeds
        :data:`~imaml_ext.diagnostics.RESIDUAL_WARN_THRESHOLD` or a task's
        CG met pᵀAp ≤ 0; ``info["batching"]``
        says how the tasks were batched and, for ``"auto"``, why.
    """
    check_batching(batching)
    task_loss = TaskLoss(model, loss_fn)
    check_task_batch(task_loss, support_x, support_y)
    lam = check_positive("lam", lam)
    inner_lr = check_positive("inner_lr", inner_lr, INNER_LR_RULE)
    inner_steps = check_steps("inner_steps", inner_steps)
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")
    # compat="imaml_dev": cg_steps ≤ 1 is no solve, as in the official loop.
    cg_steps = check_steps("cg_steps", cg_steps, minimum=0 if compat == "imaml_dev" else 1,
                           hint="" if compat == "imaml_dev" else " (0 CG steps would give a zero meta-gradient)")
    inner_cg_steps = check_steps("inner_cg_steps", inner_cg_steps)
    cg_tol = optional_positive("cg_tol", cg_tol)
    max_grad_norm = optional_positive("max_grad_norm", max_grad_norm)
    solver = _linear_solver(linear_solver, cg_steps, cg_tol, compat, support_x.shape[0])
    if inner_solver not in INNER_SOLVERS:
        raise ValueError(f"inner_solver must be one of {INNER_SOLVERS}, got {inner_solver!r}")
    if hvp_mode not in HVP_MODES + ("auto",):
        raise ValueError(f"hvp_mode must be one of {HVP_MODES + ('auto',)}, got {hvp_mode!r}")
    if cg_damping is not None and compat != "imaml_dev":
        raise ValueError("cg_damping is the damping of compat='imaml_dev''s operator; it applies "
                         "only with compat='imaml_dev' (use operator=(a, b) otherwise)")
    if inner_solver == "hf" and compat == "imaml_dev":
        raise ValueError("compat='imaml_dev' runs the official code's GD inner loop; "
                         "use inner_solver='gd' with it")
    if inner_solver == "hf" and max_grad_norm is not None:
        raise ValueError("max_grad_norm clips the GD inner loop's gradients; "
                         "inner_solver='hf' does not use it")
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    inner_tol = optional_positive("inner_tol", inner_tol)
    if compat == "imaml_dev" and (curvature != "hessian" or inner_tol is not None):
        raise ValueError("compat='imaml_dev' reproduces the official code, which has no curvature "
                         "or inner_tol option; pass neither with it")
    if inner_momentum is not None:
        if inner_solver != "nesterov":
            raise ValueError("inner_momentum is the momentum of inner_solver='nesterov'; "
                             f"inner_solver={inner_solver!r} does not use it")
        inner_momentum = check_nonnegative("inner_momentum", inner_momentum)
        if inner_momentum >= 1:
            raise ValueError(f"inner_momentum must be < 1 (β ≥ 1 diverges), got {inner_momentum!r}")
    if task_loss.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"imaml needs float32 or float64 parameters, got {task_loss.dtype}; "
                        "call model.float() (or .double()) first")
    if operator is not None and (not isinstance(operator, (tuple, list)) or len(operator) != 2):
        raise ValueError(f"operator must be a pair (a, b) for A = a·I + b·H, got {operator!r}")

    if task_chunk is not None:
        task_chunk = check_steps("task_chunk", task_chunk, minimum=1)
    chunks = task_chunks(support_x.shape[0], task_chunk)

    x, y = support_x, support_y
    info: Dict[str, object] = {"batching": task_loss.select_batching(batching, x, y)}
    if compat == "imaml_dev":
        if operator is not None:
            raise ValueError("compat='imaml_dev' fixes the operator; do not pass operator as well")
        cg_damping = 1.0 if cg_damping is None else cg_damping
        cg_damping = check_nonnegative("cg_damping", cg_damping)
        a, b = 1.0 + cg_damping, 1.0 / (lam + 10.0)

        def solve_chunk(theta, x, y, found):
            return inner.solve_imaml_dev(task_loss, theta, x, y, lam=lam, steps=inner_steps,
                                         lr=inner_lr, max_grad_norm=max_grad_norm)
    else:
        a, b = (1.0, 1.0 / lam) if operator is None else map(float, operator)
        if inner_solver == "gd":
            def solve_chunk(theta, x, y, found):
                return inner.solve_gd(task_loss, theta, x, y, lam=lam, steps=inner_steps, lr=inner_lr,
                                      max_grad_norm=max_grad_norm, tol=inner_tol, diagnostics=found)
        elif inner_solver == "nesterov":
            def solve_chunk(theta, x, y, found):
                return inner.solve_nesterov(task_loss, theta, x, y, lam=lam, steps=inner_steps,
                                            lr=inner_lr, momentum=inner_momentum,
                                            max_grad_norm=max_grad_norm, tol=inner_tol, diagnostics=found)
        else:
            def solve_chunk(theta, x, y, found):
                return inner.solve_hf(task_loss, theta, x, y, lam=lam, steps=inner_steps,
                                      cg_steps=inner_cg_steps, hvp_mode=hvp_mode, curvature=curvature,
                                      tol=inner_tol, diagnostics=found)
    if not a > 0:
        raise ValueError(f"the operator's identity coefficient a must be > 0, got {a}")

    def solve(theta):
        if len(chunks) == 1:
            found: dict = {}
            phi = solve_chunk(theta, x, y, found)
        else:
            phi = theta.new_empty(x.shape[0], theta.numel())
            parts = []
            for c in chunks:
                parts.append({})
                try:
                    phi[c] = solve_chunk(theta, x[c], y[c], parts[-1])
                except inner.NonFiniteLossError as e:
                    raise inner.NonFiniteLossError(
                        f"in the chunk of tasks {c.start}..{c.stop - 1} (task_chunk={task_chunk}; the "
                        f"task numbers count from {c.start}): {e}") from e
            found = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if found:  # compat="imaml_dev" records none
            diagnostics.record_inner(info, found)
        return phi

    system = _ImplicitSystem(task_loss=task_loss, x=x, y=y, a=a, b=b, hvp_mode=hvp_mode,
                             solver=solver, info=info, curvature=curvature, chunks=chunks)
    phi = _ImplicitMetaGrad.apply(task_loss.theta(), solve, system)
    streamed = None if len(chunks) == 1 else lambda: functools.partial(_StreamedChunks(system, phi).phi_of,
                                                                        task_loss.theta())
    return Adapted(task_loss, phi, info, task_chunk=task_chunk, streamed=streamed)
