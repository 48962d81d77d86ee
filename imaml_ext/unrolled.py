"""MAML through K unrolled inner steps: full, first-order and checkpointed, and Reptile.

Every task t starts from the meta-parameters θ (``[P]``) and takes K steps of
an in-graph optimizer (:mod:`imaml_ext.inner_optim`) on its support loss,
all tasks at once over a ``[T, P]`` buffer:

    (φ_{k+1}, s_{k+1}) = U(φ_k, ∇L̂_k(φ_k), s_k; α),   φ_0 = θ,  s_0 = 0.

The meta-gradient of a query loss L(φ_K) is Σ_t a_{0,t}, where the adjoint
a_k = ∂L/∂φ_k runs backwards through the steps.  Three ways to get it:

* ``"full"``: the loop is built with ``create_graph=True`` and autograd
  differentiates through it.  Exact; memory grows with K × activations.
* ``"first_order"`` (FOMAML): dφ_K/dθ is taken as I, so the meta-gradient
  is Σ_t ∂L/∂φ_{K,t}.  The loop runs without a graph; the learning rate's
  gradient is then 0.
* ``"checkpointed"``: :class:`_CheckpointedMAML` runs the loop without a
  graph, keeping (φ_k, s_k) every c steps.  Its backward walks the segments
  in reverse; each segment is recomputed once from its snapshot, keeping its
  c points, and the adjoint is taken back one step at a time.  For plain SGD
  with one learning rate, a_k = a_{k+1} − α H(φ_k) a_{k+1}, with the batched
  HVP and ``ops.adjoint_sgd_step_``, which also accumulates ∂L/∂α_t =
  −Σ_k ⟨∇L̂_k(φ_k), a_{k+1}⟩.  Otherwise (momentum, RMSProp, per-tensor
  rates) each step is a vector-Jacobian product through a recomputed
  one-step graph (φ_k, s_k, α) -> (φ_{k+1}, s_{k+1}).  Memory is about
  (K/c + c) snapshots of size P(1 + #state) plus one step's activations.
  Equal to ``"full"`` to rounding.

Batch-norm layers use batch statistics (TaskLoss rejects running statistics in
training mode); in eval mode they read their stored statistics, which no mode,
the recomputation included, ever updates.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .adapted import Adapted
from .finite import FiniteWatch
from .flat import ParamLayout
from .functional import TaskLoss
from .hvp import HVP_MODES, Matvec, default_mode, grad_and_hvp, make_hvp
from .inner_optim import OPTIMIZERS, SGD, InnerOptimizer, LearningRate, make_optimizer
from .validation import (check_batching, check_positive, check_steps, check_task_batch, deprecated_alias,
                         is_integer)

__all__ = ["maml", "reptile_grad", "plan_checkpoints", "CheckpointSchedule", "MODES", "COMPILED_MODES", "INNER_SOLVERS"]

MODES = ("full", "first_order", "checkpointed")
#: The modes whose inner steps keep no graph, which ``batching="compiled"`` compiles.
COMPILED_MODES = ("first_order", "checkpointed")
INNER_SOLVERS = OPTIMIZERS
_HINT = "lower inner_lr, or check the data and loss_fn"

State = Tuple[torch.Tensor, ...]
Snapshot = Tuple[torch.Tensor, State]


def clip_rows(a: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale each task's row of ``a`` (``[T, P]``) to global norm ≤ ``max_norm``:
    a_t · max_norm / max(max_norm, ‖a_t‖), as torch_maml clips the flow through a step."""
    norm = torch.linalg.vector_norm(a, dim=1)
    return a * (max_norm / norm.clamp_min(max_norm)).unsqueeze(1)


class _ClipFlow(torch.autograd.Function):
    """Identity on the forward pass; clips each task's incoming gradient with
    :func:`clip_rows` on the backward pass.  An autograd node rather than a
    tensor hook, so the inner loop's own ``autograd.grad`` calls with respect
    to φ are not clipped."""

    @staticmethod
    def forward(ctx, phi: torch.Tensor, max_norm: float) -> torch.Tensor:
        ctx.max_norm = max_norm
        return phi.view_as(phi)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return clip_rows(grad, ctx.max_norm), None


class _Support:
    """Support data per inner step: the same ``[T, n, ...]`` batch at every step,
    or step k's slice of ``[T, K, n, ...]`` with ``per_step``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, per_step: bool):
        self.x, self.y, self.per_step = x, y, per_step

    def at(self, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return (self.x[:, k], self.y[:, k]) if self.per_step else (self.x, self.y)


class _InnerLoop:
    """The fixed ingredients of the inner loop and its graph-free trajectory."""

    def __init__(self, task_loss: TaskLoss, opt: InnerOptimizer, support: _Support, lr: LearningRate,
                 steps: int, hvp_mode: str, info: Dict[str, object]):
        self.task_loss, self.opt, self.support, self.lr = task_loss, opt, support, lr
        self.steps, self.hvp_mode, self.info = steps, hvp_mode, info
        self.keep_graphs = False  # checkpointed: the replay keeps each step's graph (CheckpointSchedule)

    def start(self, theta: torch.Tensor) -> Snapshot:
        """φ_0 = θ for every task ``[T, P]`` (a copy, no graph) and s_0 = 0."""
        phi = theta.detach().unsqueeze(0).repeat(self.support.x.shape[0], 1)
        return phi, self.opt.init(phi)

    def run(self, theta: torch.Tensor, lr_eff: torch.Tensor, every: Optional[int]) -> Tuple[torch.Tensor, List[Snapshot]]:
        """φ_K ``[T, P]`` without a graph, and the snapshots (φ_k, s_k) at k = 0, c, 2c, ...
        (none when ``every`` is None).  Records the support losses ``[K, T]`` in
        ``info["inner_losses"]``; raises NonFiniteLossError after the loop."""
        phi, state = self.start(theta)
        watch = FiniteWatch(phi.shape[0], phi.device)
        snapshots: List[Snapshot] = []
        losses = []
        for k in range(self.steps):
            if every is not None and k % every == 0:
                snapshots.append((phi, state))  # the optimizers never write in place
            g, loss = self.task_loss.grad(phi, *self.support.at(k))
            watch.update(k, loss)
            losses.append(loss)
            phi, state = self.opt.step(phi, g, state, lr_eff, k == 0)
        self.info["inner_losses"] = _stack_losses(losses, phi)
        watch.raise_if_bad(f"MAML inner loop ({self.opt.name})", _HINT)
        return phi, snapshots

    def replay(self, snapshot: Snapshot, start: int, stop: int, lr_eff: torch.Tensor, keep_grads: bool,
               keep_graphs: bool = False) -> List[Tuple[torch.Tensor, State, Optional[torch.Tensor], Optional[Matvec]]]:
        """Recompute (φ_k, s_k) for k in [start, stop) from the snapshot at ``start``,
        with ∇L̂_k(φ_k) when ``keep_grads`` (else None) and, with ``keep_graphs``, the
        reverse-mode HVP at φ_k built on the graph of that same gradient (else None)."""
        phi, state = snapshot
        points = []
        for k in range(start, stop):
            last = k == stop - 1
            matvec = None
            if keep_graphs:
                g, matvec = grad_and_hvp(self.task_loss.per_task, phi, *self.support.at(k),
                                          self.task_loss.batching)
            else:
                g = self.task_loss.grad(phi, *self.support.at(k))[0] if keep_grads or not last else None
            points.append((phi, state, g if keep_grads else None, matvec))
            if not last:
                phi, state = self.opt.step(phi, g, state, lr_eff, k == 0)
        return points

    def step_graph_bytes(self, phi: torch.Tensor) -> int:
        """Bytes that one step's gradient graph (kept for a reverse-mode HVP) holds at
        ``phi`` ``[T, P]``: the storages its saved tensors use, each counted once, φ's own
        excepted; measured by building it at step 0."""
        seen = {phi.untyped_storage().data_ptr()}
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            grad_and_hvp(self.task_loss.per_task, phi, *self.support.at(0), self.task_loss.batching)
        return total


def _stack_losses(losses: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.stack(list(losses)) if losses else like.new_zeros(0, like.shape[0])


class _FirstOrderMAML(torch.autograd.Function):
    """theta [P] -> φ_K [T, P]; backward: Σ_t of the incoming gradient (dφ_K/dθ := I),
    zero for the learning rates."""

    @staticmethod
    def forward(theta: torch.Tensor, loop: _InnerLoop, *lr_values: torch.Tensor) -> torch.Tensor:
        phi, _ = loop.run(theta, loop.lr.expand([v.detach() for v in lr_values]), None)
        return phi

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.lr_zeros = [torch.zeros_like(v) for v in inputs[2:]]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_phi: torch.Tensor):
        return (grad_phi.sum(0), None, *ctx.lr_zeros)


class _CheckpointedMAML(torch.autograd.Function):
    """theta [P] -> φ_K [T, P] keeping snapshots every c steps; backward by the
    adjoint recursion over recomputed segments (see the module docstring).

    ``forward`` returns (φ_K, α, *snapshot tensors): the intermediates that
    the backward pass needs are outputs, marked non-differentiable, so that
    ``setup_context`` can save them; :func:`maml` keeps φ_K only.
    """

    @staticmethod
    def forward(theta: torch.Tensor, loop: _InnerLoop, every: int, max_norm: Optional[float],
                *lr_values: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        # A clone: α may be the caller's rate tensor itself, and an output must not alias an input.
        lr_eff = loop.lr.expand([v.detach() for v in lr_values]).clone()
        phi, snapshots = loop.run(theta, lr_eff, every)
        return (phi, lr_eff, *[t for phi_k, s_k in snapshots for t in (phi_k, *s_k)])

    @staticmethod
    def setup_context(ctx, inputs, output):
        loop, every, max_norm, lr_values = inputs[1], inputs[2], inputs[3], inputs[4:]
        lr_eff, snapshots = output[1], output[2:]
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero gradients for the snapshots
        # Saved through autograd, so they are freed after backward (unless retain_graph).
        ctx.save_for_backward(lr_eff, *lr_values, *snapshots)
        ctx.loop, ctx.every, ctx.max_norm, ctx.num_rates = loop, every, max_norm, len(lr_values)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_phi: Optional[torch.Tensor], *_unused):
        loop: _InnerLoop = ctx.loop
        saved = ctx.saved_tensors
        lr_eff, lr_values = saved[0], saved[1:1 + ctx.num_rates]
        if grad_phi is None:  # the loss does not depend on φ_K
            return (None, None, None, None, *[None] * ctx.num_rates)
        width = 1 + loop.opt.num_state
        flat = saved[1 + ctx.num_rates:]
        snapshots = [(flat[i], tuple(flat[i + 1:i + width])) for i in range(0, len(flat), width)]
        need_lr = ctx.needs_input_grad[4:]
        fused = isinstance(loop.opt, SGD) and not loop.lr.per_tensor
        lr_grad_t = grad_phi.new_zeros(grad_phi.shape[0]) if fused and need_lr[0] else None
        lr_grads = [None if not need else torch.zeros_like(v) for v, need in zip(lr_values, need_lr)]
        lr_float = float(lr_eff) if fused else 0.0  # once per backward: the fused op takes a float
        a = grad_phi.contiguous().clone()
        b = loop.opt.init(a)
        for j in reversed(range(len(snapshots))):
            start = j * ctx.every
            stop = min(start + ctx.every, loop.steps)
            points = loop.replay(snapshots[j], start, stop, lr_eff, keep_grads=lr_grad_t is not None,
                                 keep_graphs=fused and loop.keep_graphs)
            for k in reversed(range(start, stop)):
                phi, state, g, matvec = points.pop()
                if ctx.max_norm is not None:
                    a = clip_rows(a, ctx.max_norm)
                if fused:
                    a = _adjoint_sgd(loop, k, phi, g, a, lr_grad_t, lr_float, matvec)
                else:
                    a, b, step_lr = _adjoint_vjp(loop, k, phi, state, a, b, lr_values, need_lr)
                    lr_grads = [acc if d is None else acc + d for acc, d in zip(lr_grads, step_lr)]
        if lr_grad_t is not None:
            lr_grads[0] = lr_grad_t.sum().to(lr_values[0].dtype)
        return (a.sum(0), None, None, None, *lr_grads)


def _adjoint_sgd(loop: _InnerLoop, k: int, phi: torch.Tensor, g: Optional[torch.Tensor], a: torch.Tensor,
                 lr_grad_t: Optional[torch.Tensor], lr: float, matvec: Optional[Matvec] = None) -> torch.Tensor:
    """a_k = a_{k+1} − α H(φ_k) a_{k+1} (H symmetric), in place on ``a``; with ``g`` = ∇L̂_k(φ_k),
    also lr_grad_t −= ⟨g_t, a_{k+1,t}⟩ (the fused op).  ``matvec``: H(φ_k)'s product kept
    from the replay (else built here)."""
    if matvec is None:
        matvec = make_hvp(loop.task_loss.per_task, phi, *loop.support.at(k), loop.hvp_mode,
                          loop.task_loss.batching)
    Ha = matvec(a).contiguous()
    if lr_grad_t is None:
        return a.sub_(Ha, alpha=lr)
    ops.adjoint_sgd_step_(a, Ha, g, lr_grad_t, lr)
    return a


def _adjoint_vjp(loop: _InnerLoop, k: int, phi: torch.Tensor, state: State, a: torch.Tensor, b: State,
                 lr_values: Sequence[torch.Tensor], need_lr: Sequence[bool]):
    """One reverse step through a recomputed graph of (φ_k, s_k, α) -> (φ_{k+1}, s_{k+1}):
    returns (a_k, b_k, per-rate gradient contributions or None)."""
    with torch.enable_grad():
        p = phi.detach().requires_grad_(True)
        s = tuple(t.detach().requires_grad_(True) for t in state)
        rates = [v.detach().requires_grad_(need) for v, need in zip(lr_values, need_lr)]
        (g,) = torch.autograd.grad(loop.task_loss.losses(p, *loop.support.at(k)).sum(), p,
                                   create_graph=True, allow_unused=True)
        if g is None:
            g = torch.zeros_like(p)
        p_next, s_next = loop.opt.step(p, g, s, loop.lr.expand(rates), k == 0)
        wrt = [p, *s, *[r for r in rates if r.requires_grad]]
        grads = torch.autograd.grad([p_next, *s_next], wrt, [a, *b], allow_unused=True)
    grads = [torch.zeros_like(w) if d is None else d for w, d in zip(wrt, grads)]
    n = 1 + len(s)
    rate_grads = iter(grads[n:])
    return grads[0], tuple(grads[1:n]), [next(rate_grads) if need else None for need in need_lr]


@dataclass(frozen=True)
class CheckpointSchedule:
    """How checkpointed MAML trades memory for recomputation.

    every: c, steps between snapshots.  keep_graphs: the backward pass replays
    a segment keeping each step's gradient graph and takes the adjoint's HVPs
    on those graphs (one forward and backward pass per step fewer than
    rebuilding them, the memory of c graphs).  estimated_bytes: the estimate
    of what the schedule holds beyond the model; step_graph_bytes: one step's
    graph, measured; budget: the memory_budget asked for.
    """

    every: int
    keep_graphs: bool
    estimated_bytes: int
    step_graph_bytes: int
    budget: Optional[int]


def plan_checkpoints(steps: int, snapshot_bytes: int, graph_bytes: int, budget: int,
                     graphs_allowed: bool = True) -> CheckpointSchedule:
    """The fastest schedule that fits ``budget`` bytes, for K = ``steps``, snapshots
    (φ_k, s_k) of ``snapshot_bytes`` and one step's gradient graph of ``graph_bytes``.

    Memory: with kept graphs, interval c holds ⌈K/c⌉ snapshots and c points with their
    graphs; without, ⌈K/c⌉ snapshots, c points and one graph at a time.  Time, in
    forward-and-backward passes per step beyond the forward loop, the HVP's graph and
    its product: none with kept graphs (the replay's gradient graph is the HVP's);
    without, the replay's gradients, (c − 1)/c.  Among the schedules that fit, the
    fastest, then the smallest; when none fits, the smallest without kept graphs (its
    estimate above the budget: :func:`maml` warns).
    """
    s, G = snapshot_bytes, graph_bytes

    def cost(c: int, graphs: bool) -> int:
        return math.ceil(steps / c) * s + (c * (s + G) if graphs else c * s + G)

    def extra_passes(c: int, graphs: bool) -> float:
        return 0.0 if graphs else (c - 1) / c

    options = [(c, graphs) for graphs in ((True, False) if graphs_allowed else (False,))
               for c in range(1, steps + 1)]
    fitting = [o for o in options if cost(*o) <= budget]
    if fitting:
        c, graphs = min(fitting, key=lambda o: (extra_passes(*o), cost(*o)))
    else:
        c, graphs = min(((c, False) for c in range(1, steps + 1)), key=lambda o: cost(*o))
    return CheckpointSchedule(c, graphs, cost(c, graphs), G, budget)


def _full_maml(loop: _InnerLoop, theta: torch.Tensor, max_norm: Optional[float]) -> torch.Tensor:
    """φ_K with the whole inner loop in the autograd graph (create_graph=True).
    ``max_norm`` clips the gradient flowing into each φ_{k+1} (k = 0..K-1) with :class:`_ClipFlow`."""
    lr_eff = loop.lr.expand()
    phi = theta.unsqueeze(0).expand(loop.support.x.shape[0], -1)
    state = loop.opt.init(phi)
    watch = FiniteWatch(phi.shape[0], phi.device)
    losses = []
    for k in range(loop.steps):
        loss = loop.task_loss.losses(phi, *loop.support.at(k))
        watch.update(k, loss.detach())
        losses.append(loss.detach())
        (g,) = torch.autograd.grad(loss.sum(), phi, create_graph=True)
        phi, state = loop.opt.step(phi, g, state, lr_eff, k == 0)
        if max_norm is not None:
            phi = _ClipFlow.apply(phi, max_norm)
    loop.info["inner_losses"] = _stack_losses(losses, phi)
    watch.raise_if_bad(f"MAML inner loop ({loop.opt.name})", _HINT)
    return phi


def _check_support(task_loss: TaskLoss, x, y, steps: int, per_step: bool) -> None:
    if not per_step:
        check_task_batch(task_loss, x, y)
        return
    for name, t in (("support_x", x), ("support_y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() < 3 or t.shape[1] != steps:
            raise ValueError(
                f"with per_step_support=True, {name} must be [T, K={steps}, n, ...] (one support "
                f"batch per inner step), got shape {tuple(t.shape)}")
    check_task_batch(task_loss, x.flatten(1, 2), y.flatten(1, 2))


def maml(model: nn.Module, support_x: torch.Tensor, support_y: torch.Tensor,
         loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy, *,
         inner_steps: int = 5, inner_lr=0.4, mode: str = "full", inner_solver: Optional[str] = None,
         momentum: Optional[float] = None, beta: Optional[float] = None, eps: Optional[float] = None,
         checkpoint_every: Optional[int] = None, max_grad_grad_norm: Optional[float] = None,
         per_step_support: bool = False, hvp_mode: str = "auto",
         optimizer: Optional[str] = None, memory_budget: Optional[int] = None,
         batching: str = "vmap") -> Adapted:
    """Adapt ``model`` to T tasks with K inner steps; the result's backward yields
    the MAML meta-gradient on ``model``'s parameters (and on ``inner_lr`` if it
    requires grad).

    Args:
        model: any ``nn.Module``; its trainable parameters are θ (one dtype,
            one device).  Batch-norm must use batch statistics.
        support_x: ``[T, n, ...]`` support inputs, task dimension first; with
            ``per_step_support`` ``[T, K, n, ...]``, batch k used at step k.
        support_y: ``[T, n, ...]`` (or ``[T, K, n, ...]``) support targets.
        loss_fn: ``loss_fn(outputs [n, ...], targets [n, ...]) -> scalar``, one task.
        inner_steps: K ≥ 0.
        inner_lr: α: a number > 0 (for no adaptation pass ``inner_steps=0``,
            the same rule as :func:`~imaml_ext.imaml`), a floating 0-dim
            tensor (which may require grad: a learnable rate; its value is not
            checked), or one such rate per trainable parameter tensor,
            as a dict keyed by parameter name or a sequence in
            ``model.named_parameters()`` order.
        mode: ``"full"``, ``"first_order"`` or ``"checkpointed"`` (module
            docstring).  In ``"first_order"`` the learning rates get a zero
            gradient.  Under ``torch.no_grad()`` every mode runs the loop
            without a graph.
        inner_solver: the in-graph inner optimizer: ``"sgd"`` (default),
            ``"momentum"`` (``momentum``, default 0.9) or ``"rmsprop"``
            (``beta``, default 0.99; ``eps``, default 1e-8), see
            :mod:`imaml_ext.inner_optim`.
        checkpoint_every: c, steps between snapshots (``"checkpointed"``
            only), 1 ≤ c ≤ K; default round(√K).
        max_grad_grad_norm: clips the backward flow per task, torch_maml-style:
            the gradient with respect to each φ_{k+1} (k = K-1, ..., 0,
            φ_K's incoming gradient included) is scaled to global norm ≤ this
            value before it is taken back through step k.  The optimizer
            state's gradient is not clipped.  ``"checkpointed"`` clips the
            adjoint before each reverse step; ``"full"`` does the same with an
            identity autograd node after each φ_{k+1} whose backward clips, so
            both agree.  Not available in
            ``"first_order"``, which has no flow through the steps.  None:
            no clipping.
        per_step_support: a different support batch at every inner step.
        hvp_mode: HVP used by ``"checkpointed"`` SGD (:mod:`imaml_ext.hvp`).
        optimizer: the old name of ``inner_solver`` (DeprecationWarning;
            passing both is an error).
        memory_budget: bytes that ``"checkpointed"`` may hold for its
            snapshots, replayed points and graphs (beyond the model, the data
            and the query loss); it then picks c and whether the replay keeps
            each step's gradient graph for the HVPs of the adjoint (faster:
            one forward and backward pass per step fewer), from one step's
            graph measured at step 0 (:func:`plan_checkpoints`).  The schedule
            is in ``info["checkpoint_schedule"]``.  Exclusive with
            ``checkpoint_every``.  None: c = ``checkpoint_every`` or round(√K),
            no kept graphs.
        batching: how the model runs over the tasks (:mod:`imaml_ext.batching`):
            ``"vmap"`` (one batched call; dropout draws per-task masks),
            ``"loop"`` (one call per task: any module, e.g. an LSTM, slower),
            ``"compiled"`` (``"vmap"`` with the graph-free inner steps (``"first_order"``, ``"checkpointed"``'s first pass; not ``"full"``) compiled by
            ``torch.compile``: tens of seconds at the first call per model,
            shape and dtype, then faster; :mod:`imaml_ext.compiled`)
            or ``"auto"`` (``"vmap"`` or ``"loop"``, measured once per architecture and shape).

    Returns:
        :class:`~imaml_ext.adapted.Adapted` holding φ_K ``[T, P]``;
        ``info["inner_losses"]`` is the ``[K, T]`` support loss before each step,
        ``info["inner_solver"]`` (also under its old key ``"optimizer"``) the
        inner optimizer's name, ``info["batching"]`` how the tasks were
        batched and, for ``"auto"``, why.

    Raises:
        NonFiniteLossError: a support loss was NaN or infinite, naming the
            task and the step.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_batching(batching)
    if batching == "compiled" and mode not in COMPILED_MODES:
        raise ValueError("batching='compiled' compiles the inner steps' gradients that keep no graph; "
                         "mode='full' differentiates through every step and has none: use batching='vmap'")
    task_loss = TaskLoss(model, loss_fn)
    inner_steps = check_steps("inner_steps", inner_steps)
    _check_support(task_loss, support_x, support_y, inner_steps, per_step_support)
    solver_arg = "inner_solver" if optimizer is None else "optimizer"  # error messages name what was passed
    name = deprecated_alias("inner_solver", inner_solver, "optimizer", optimizer, "sgd")
    opt = make_optimizer(name, momentum=momentum, beta=beta, eps=eps, arg=solver_arg)
    lr = LearningRate(inner_lr, task_loss.layout, task_loss.dtype, task_loss.device)
    if hvp_mode not in HVP_MODES + ("auto",):
        raise ValueError(f"hvp_mode must be one of {HVP_MODES + ('auto',)}, got {hvp_mode!r}")
    if checkpoint_every is not None and mode != "checkpointed":
        raise ValueError(f"checkpoint_every applies to mode='checkpointed' only, not {mode!r}")
    if max_grad_grad_norm is not None:
        if mode == "first_order":
            raise ValueError("max_grad_grad_norm clips the gradient flowing back through the inner steps; "
                             "mode='first_order' has no such flow (dφ_K/dθ is taken as I)")
        max_grad_grad_norm = check_positive("max_grad_grad_norm", max_grad_grad_norm)
    if memory_budget is not None:
        if mode != "checkpointed":
            raise ValueError(f"memory_budget applies to mode='checkpointed' only, not {mode!r}")
        if checkpoint_every is not None:
            raise ValueError("give memory_budget (the schedule is chosen to fit it) or checkpoint_every "
                             "(a fixed snapshot interval), not both")
        memory_budget = check_steps("memory_budget", memory_budget, minimum=1)
    every = 1
    if mode == "checkpointed" and inner_steps > 0:
        every = max(1, round(inner_steps ** 0.5)) if checkpoint_every is None else checkpoint_every
        if not is_integer(every) or not 1 <= int(every) <= inner_steps:
            raise ValueError(f"checkpoint_every must be an integer in [1, inner_steps={inner_steps}], "
                             f"got {checkpoint_every!r}")
        every = int(every)

    support = _Support(support_x, support_y, per_step_support)
    info: Dict[str, object] = {"mode": mode, "inner_solver": opt.name, "optimizer": opt.name,
                               "batching": task_loss.select_batching(batching, *support.at(0))}
    loop = _InnerLoop(task_loss, opt, support, lr,
                      inner_steps, hvp_mode, info)
    theta = task_loss.theta()
    if mode == "full" and torch.is_grad_enabled():
        phi = _full_maml(loop, theta, max_grad_grad_norm)
    elif mode == "checkpointed":
        if memory_budget is not None and inner_steps > 0:
            schedule = _schedule(loop, theta, memory_budget)
            every, loop.keep_graphs = schedule.every, schedule.keep_graphs
            info["checkpoint_schedule"] = schedule
        phi = _CheckpointedMAML.apply(theta, loop, every, max_grad_grad_norm, *lr.values)[0]
    else:
        phi = _FirstOrderMAML.apply(theta, loop, *lr.values)
    return Adapted(task_loss, phi, info)


def _schedule(loop: _InnerLoop, theta: torch.Tensor, budget: int) -> CheckpointSchedule:
    """:func:`plan_checkpoints` for this loop: kept graphs only where the adjoint is the fused
    SGD step with reverse-mode HVPs."""
    phi, state = loop.start(theta)
    snapshot_bytes = sum(t.numel() * t.element_size() for t in (phi, *state))
    hvp_mode = default_mode(phi.device) if loop.hvp_mode == "auto" else loop.hvp_mode
    graphs_allowed = isinstance(loop.opt, SGD) and not loop.lr.per_tensor and hvp_mode == "reverse"
    graph_bytes = loop.step_graph_bytes(phi)
    schedule = plan_checkpoints(loop.steps, snapshot_bytes, graph_bytes, budget, graphs_allowed)
    if schedule.estimated_bytes > budget:
        warnings.warn(f"checkpointed MAML: no schedule fits memory_budget={budget} bytes; the least "
                      f"(a snapshot every {schedule.every} steps) needs about {schedule.estimated_bytes} "
                      f"bytes", RuntimeWarning, stacklevel=3)
    return schedule


def reptile_grad(model: nn.Module, adapted: Union[Adapted, torch.Tensor], *, write: bool = False) -> torch.Tensor:
    """The Reptile meta-gradient θ − (1/T) Σ_t φ_t as a ``[P]`` vector.

    ``adapted`` is the result of an inner loop (e.g. ``maml(...,
    mode="first_order")``, under ``torch.no_grad()`` for no graph) or its
    ``[T, P]`` buffer, laid out as ``model``'s trainable parameters.  Only
    with ``write=True`` is the gradient added to each parameter's ``.grad``
    (set where it is None), like ``backward()``, so an outer
    ``torch.optim.SGD`` with rate ε performs θ ← θ − ε(θ − φ̄); by default
    nothing is written.
    """
    layout = ParamLayout.from_module(model)
    phi = adapted.flat if isinstance(adapted, Adapted) else adapted
    if phi.dim() != 2 or phi.shape[1] != layout.numel:
        raise ValueError(f"adapted parameters must be [T, P={layout.numel}], got shape {tuple(phi.shape)}")
    params = dict(model.named_parameters())
    theta = layout.flatten(params).detach()
    grad = theta - phi.detach().mean(0)
    if write:
        for name, g in layout.unflatten(grad).items():
            p = params[name]
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)
    return grad
