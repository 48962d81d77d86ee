"""The meta-gradients of imaml_ext's methods, written with the libraries people use today.

Each function computes the meta-gradient of the summed query cross-entropy
Σ_t L_t(φ_t) of a meta-batch into ``model``'s ``.grad`` (the caller zeroes it),
one task at a time, the way the library's documentation or examples use it:

* ``higher`` 0.2.1: ``higher.innerloop_ctx`` around ``torch.optim.SGD``
  (full MAML; ``track_higher_grads=False`` for first-order MAML).
* ``torchopt`` 0.7.3: ``torchopt.MetaSGD`` on the module (full MAML), and
  implicit differentiation with ``torchopt.diff.implicit.custom_root`` and
  ``torchopt.linear_solve.solve_cg`` (iMAML), both as its iMAML example writes
  it (a tuple of parameter tensors, the λ-regularised objective's gradient as
  the optimality condition) and in its fastest per-task form found here (one
  flat parameter vector, so CG works on one tensor instead of a tree).
* ``torch_maml`` 1.0: ``GradientCheckpointMAML`` with
  ``IngraphGradientDescent`` (checkpointed MAML).

Every task's inputs are ``xs[t]`` ``[n, ...]``; ``xs``/``ys``/``xq``/``yq``
are ``[T, n, ...]`` batches as imaml_ext takes them.  The imports happen
inside the functions, so this module loads without the peers installed
(``pip install ".[peers]"`` installs them).

Where a peer's default differs from imaml_ext's math, the call sets it
explicitly (and says so): TorchOpt's CG stops at a relative residual 1e-5
by default, set to 0 here so that it runs exactly ``cg_steps`` iterations as
imaml_ext's CG does; its iMAML example uses ``solve_normal_cg`` (CG on the
normal equations, a different iteration), replaced by ``solve_cg``.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

PEERS = ("higher", "torchopt", "torch_maml")


def peer_status(name: str) -> str:
    """'' when the peer package imports, else why not (with the install hint)."""
    try:
        __import__(name)
    except Exception as e:  # any import failure means: leave this peer out
        return f"{name} not importable ({type(e).__name__}: {e}); pip install '.[peers]'"
    return ""


def peer_version(name: str) -> str:
    from importlib import metadata
    dist = {"torch_maml": "torch-maml"}.get(name, name)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


# --- full and first-order MAML ------------------------------------------------------------------

def higher_maml(model: nn.Module, xs, ys, xq, yq, *, steps: int, lr: float, first_order: bool = False) -> None:
    """higher.innerloop_ctx over torch.optim.SGD, per task; first-order with
    ``track_higher_grads=False`` (gradients then reach θ only through the query loss,
    as higher documents for first-order MAML)."""
    import higher
    inner_opt = torch.optim.SGD(model.parameters(), lr=lr)
    for t in range(xs.shape[0]):
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False,
                                  track_higher_grads=not first_order) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(F.cross_entropy(fmodel(xs[t]), ys[t]))
            query = F.cross_entropy(fmodel(xq[t]), yq[t])
            if first_order:
                # Without higher-order tracking the adapted weights are leaves of
                # their own; their gradient is the first-order meta-gradient.
                grads = torch.autograd.grad(query, fmodel.parameters())
                for p, g in zip(model.parameters(), grads):
                    p.grad = g.clone() if p.grad is None else p.grad.add_(g)
            else:
                query.backward()


def torchopt_metasgd_maml(model: nn.Module, xs, ys, xq, yq, *, steps: int, lr: float) -> None:
    """torchopt.MetaSGD on the module itself, per task, restoring θ between tasks with
    extract_state_dict / recover_state_dict as TorchOpt's MAML examples do."""
    import torchopt
    inner_opt = torchopt.MetaSGD(model, lr=lr)
    net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
    opt_state = torchopt.extract_state_dict(inner_opt, by="reference")
    for t in range(xs.shape[0]):
        for _ in range(steps):
            inner_opt.step(F.cross_entropy(model(xs[t]), ys[t]))
        F.cross_entropy(model(xq[t]), yq[t]).backward()
        torchopt.recover_state_dict(model, net_state)
        torchopt.recover_state_dict(inner_opt, opt_state)


# --- checkpointed MAML ---------------------------------------------------------------------------

def torch_maml_checkpointed(model: nn.Module, xs, ys, xq, yq, *, steps: int, lr: float,
                            checkpoint_steps: int) -> None:
    """torch_maml.GradientCheckpointMAML with IngraphGradientDescent, per task
    (it has no task dimension), as its README writes it."""
    import torch_maml

    def compute_loss(m, data):
        x, y = data
        return F.cross_entropy(m(x), y)

    maml = torch_maml.GradientCheckpointMAML(model, compute_loss, checkpoint_steps=checkpoint_steps,
                                             optimizer=torch_maml.IngraphGradientDescent(lr))
    for t in range(xs.shape[0]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its torch.utils.checkpoint call predates use_reentrant
            updated, _, _ = maml([(xs[t], ys[t])] * steps)
            compute_loss(updated, (xq[t], yq[t])).backward()


# --- iMAML: implicit differentiation with TorchOpt ---------------------------------------------

def _named(model: nn.Module) -> Tuple[Tuple[str, ...], Tuple[torch.Tensor, ...]]:
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    return names, params


def torchopt_imaml_example(model: nn.Module, xs, ys, xq, yq, *, steps: int, lr: float, lam: float,
                           cg_steps: int) -> None:
    """TorchOpt's iMAML example form: a tuple of parameter tensors; the inner solver is
    ``torchopt.sgd`` on the λ-regularised support loss, decorated with ``custom_root``
    whose optimality condition is that objective's gradient (``torch.func.grad``)."""
    import torchopt
    names, meta_params = _named(model)

    def fnet(params, x):
        return functional_call(model, dict(zip(names, params)), (x,))

    def objective(params, meta_params, data):
        x, y = data
        reg = sum(0.5 * lam * torch.sum(torch.square(p - m)) for p, m in zip(params, meta_params))
        return F.cross_entropy(fnet(params, x), y) + reg

    @torchopt.diff.implicit.custom_root(
        torch.func.grad(objective, argnums=0), argnums=1, has_aux=False,
        solve=torchopt.linear_solve.solve_cg(maxiter=cg_steps, rtol=0.0, atol=0.0))
    def inner_solver(params, meta_params, data):
        x, y = data
        opt = torchopt.sgd(lr=lr)
        state = opt.init(params)
        with torch.enable_grad():
            for _ in range(steps):
                grads = torch.autograd.grad(objective(params, meta_params, data), params)
                updates, state = opt.update(grads, state, inplace=True)
                params = torchopt.apply_updates(params, updates, inplace=True)
        return params

    losses = []
    for t in range(xs.shape[0]):
        init = tuple(p.detach().clone().requires_grad_(True) for p in meta_params)
        optimal = inner_solver(init, meta_params, (xs[t], ys[t]))
        losses.append(F.cross_entropy(fnet(optimal, xq[t]), yq[t]))
    torch.stack(losses).sum().backward()


def torchopt_imaml_flat(model: nn.Module, xs, ys, xq, yq, *, steps: int, lr: float, lam: float,
                        cg_steps: int) -> None:
    """The fastest per-task TorchOpt form found: θ and φ as one flat vector, so the
    optimality condition, its Jacobian products and CG work on one tensor; the inner
    GD runs on that vector with no graph."""
    import torchopt
    names, params = _named(model)
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def loss(flat, x, y):
        views = [v.view(s) for v, s in zip(flat.split(sizes), shapes)]
        return F.cross_entropy(functional_call(model, dict(zip(names, views)), (x,)), y)

    support_grad = torch.func.grad(loss)

    def optimality(phi, theta, x, y):
        return support_grad(phi, x, y) + lam * (phi - theta)

    @torchopt.diff.implicit.custom_root(
        optimality, argnums=1, solve=torchopt.linear_solve.solve_cg(maxiter=cg_steps, rtol=0.0, atol=0.0))
    def inner_solver(phi, theta, x, y):
        with torch.no_grad():
            for _ in range(steps):
                phi = phi - lr * optimality(phi, theta, x, y)
        return phi

    theta = torch.cat([p.reshape(-1) for p in params])
    losses = []
    for t in range(xs.shape[0]):
        phi = inner_solver(theta.detach().clone(), theta, xs[t], ys[t])
        losses.append(loss(phi, xq[t], yq[t]))
    torch.stack(losses).sum().backward()


def reference_imaml_loop(model: nn.Module, xs, ys, xq, yq, *, steps: int, lr: float, lam: float,
                        cg_steps: int) -> None:
    """``reference_imaml.reference_meta_grad`` (the official algorithm, one task at a
    time, plain PyTorch, no library) for the summed query loss: it returns the
    meta-gradient of the mean over the T tasks, linear in the query gradient, so
    T times it is this one."""
    from reference_imaml import reference_meta_grad
    meta = reference_meta_grad(model, xs, ys, xq, yq, lam=lam, inner_steps=steps, inner_lr=lr,
                               cg_steps=cg_steps) * xs.shape[0]
    offset = 0
    for p in model.parameters():
        p.grad = meta[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


# --- imaml_ext, on the same problems -----------------------------------------------------------

def imaml_ext_maml(model, xs, ys, xq, yq, *, steps: int, lr: float, mode: str, **maml_options) -> Dict:
    """imaml_ext.maml (mode "full", "first_order" or "checkpointed"), all tasks at
    once; returns ``adapted.info`` (how the tasks were batched, ...)."""
    import imaml_ext as im
    adapted = im.maml(model, xs, ys, F.cross_entropy, inner_steps=steps, inner_lr=lr, mode=mode,
                      **maml_options)
    adapted.loss(xq, yq).sum().backward()
    return adapted.info


def imaml_ext_imaml(model, xs, ys, xq, yq, *, steps: int, lr: float, lam: float, cg_steps: int,
                    **imaml_options) -> Dict:
    """imaml_ext.imaml with GD inner steps and CG, all tasks at once; returns ``adapted.info``."""
    import imaml_ext as im
    adapted = im.imaml(model, xs, ys, F.cross_entropy, lam=lam, inner_steps=steps, inner_lr=lr,
                       cg_steps=cg_steps, **imaml_options)
    adapted.loss(xq, yq).sum().backward()
    return adapted.info


MetaGradient = Callable[..., object]


def meta_gradient(fn: MetaGradient, model: nn.Module, batch, **kwargs) -> torch.Tensor:
    """Run ``fn`` on a zeroed ``model`` and return the meta-gradient as one ``[P]`` vector."""
    model.zero_grad(set_to_none=True)
    fn(model, *batch, **kwargs)
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (the ≤ 1e-12 float64 check of the tests and the benchmark)."""
    return float((a - b).norm() / b.norm())

