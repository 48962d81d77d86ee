"""In-graph inner optimizers of the MAML family and their learning rate.

Each optimizer is a pure function of the current point, its gradient and its
state, ``step(phi, g, state, lr, first) -> (phi', state')``, on ``[T, P]``
buffers, with no in-place writes, so the same code runs with an autograd
graph (full MAML), without one (first-order MAML, the forward pass of
checkpointed MAML) and inside the one-step graphs that checkpointed MAML
recomputes for its backward pass.  ``state`` is a tuple of ``[T, P]`` buffers
(empty for SGD); ``first`` is true on the first inner step.  The update rules
follow torch_maml's in-graph optimizers:

* ``SGD``:       φ' = φ − α g
* ``Momentum``:  v' = μ v + g,  φ' = φ − α v'              (v₀ = 0)
* ``RMSProp``:   s' = β s + (1 − β) g²  (s' = g² on the first step),
                 φ' = φ − α g / √(s' + ε)

ε sits inside the square root, so the step stays differentiable where s' = 0.

:class:`LearningRate` holds α: one scalar, or one scalar per parameter tensor
(per-tensor rates: one learnable scalar for each parameter tensor, coarser
than Meta-SGD's per-element rates), each a float or a tensor that may require
grad.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple, Union

import torch

from .flat import ParamLayout
from .validation import INNER_LR_RULE, check_positive, real_number

__all__ = ["InnerOptimizer", "SGD", "Momentum", "RMSProp", "OPTIMIZERS", "make_optimizer",
           "LearningRate"]

State = Tuple[torch.Tensor, ...]
Rate = Union[float, torch.Tensor]


class InnerOptimizer:
    """A pure update rule on ``[T, P]`` buffers; ``num_state`` buffers of state."""

    name = ""
    num_state = 0

    def init(self, phi: torch.Tensor) -> State:
        """The state before the first step: zeros like ``phi``."""
        return tuple(torch.zeros_like(phi) for _ in range(self.num_state))

    def step(self, phi: torch.Tensor, g: torch.Tensor, state: State, lr: Rate,
             first: bool) -> Tuple[torch.Tensor, State]:
        """One update. ``lr``: a float, a 0-dim tensor or a ``[P]`` tensor."""
        raise NotImplementedError


class SGD(InnerOptimizer):
    name = "sgd"

    def step(self, phi, g, state, lr, first):
        return phi - lr * g, ()


class Momentum(InnerOptimizer):
    name = "momentum"
    num_state = 1

    def __init__(self, momentum: float):
        self.momentum = momentum

    def step(self, phi, g, state, lr, first):
        (v,) = state
        v = self.momentum * v + g
        return phi - lr * v, (v,)


class RMSProp(InnerOptimizer):
    name = "rmsprop"
    num_state = 1

    def __init__(self, beta: float, eps: float):
        self.beta = beta
        self.eps = eps

    def step(self, phi, g, state, lr, first):
        (s,) = state
        sq = g * g
        s = sq if first else self.beta * s + (1.0 - self.beta) * sq
        return phi - lr * g / torch.sqrt(s + self.eps), (s,)


OPTIMIZERS = ("sgd", "momentum", "rmsprop")
_DEFAULTS = {"momentum": {"momentum": 0.9}, "rmsprop": {"beta": 0.99, "eps": 1e-8}}


def _check_unit(name: str, value) -> float:
    number = real_number(name, value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return number


def make_optimizer(name: str, *, momentum: Optional[float] = None, beta: Optional[float] = None,
                   eps: Optional[float] = None, arg: str = "inner_solver") -> InnerOptimizer:
    """The optimizer ``name``; hyper-parameters left as None take their defaults
    (momentum 0.9; β 0.99, ε 1e-8).  Passing one that ``name`` does not use is an error.
    ``arg``: the caller's argument name, used in error messages."""
    if name not in OPTIMIZERS:
        raise ValueError(f"{arg} must be one of {OPTIMIZERS}, got {name!r}")
    given = {k: v for k, v in dict(momentum=momentum, beta=beta, eps=eps).items() if v is not None}
    allowed = _DEFAULTS.get(name, {})
    unused = sorted(set(given) - set(allowed))
    if unused:
        raise ValueError(f"{arg} {name!r} takes no {', '.join(unused)}; "
                         f"its hyper-parameters are {sorted(allowed) or 'none'}")
    hp = {**allowed, **given}
    if name == "sgd":
        return SGD()
    if name == "momentum":
        return Momentum(_check_unit("momentum", hp["momentum"]))
    return RMSProp(_check_unit("beta", hp["beta"]), check_positive("eps", hp["eps"]))


class LearningRate:
    """The inner learning rate α as 0-dim tensors: one shared by all parameters,
    or one per parameter tensor of ``layout`` (in layout order).

    ``values`` are the user's tensors (which may require grad) or constants
    made from floats; :meth:`expand` turns (possibly replaced) values into the
    factor used by the update: the 0-dim tensor itself, or a ``[P]`` vector
    holding each tensor's rate over that tensor's slice.
    """

    def __init__(self, inner_lr, layout: ParamLayout, dtype: torch.dtype, device: torch.device):
        self.dtype = dtype
        if isinstance(inner_lr, Mapping):
            missing = [n for n in layout.names if n not in inner_lr]
            extra = [n for n in inner_lr if n not in layout.names]
            if missing or extra:
                raise ValueError(
                    f"a per-tensor inner_lr needs exactly one entry per trainable parameter; "
                    f"missing {missing}, unknown {extra}")
            raw = [inner_lr[n] for n in layout.names]
        elif isinstance(inner_lr, Sequence) and not isinstance(inner_lr, str):
            if len(inner_lr) != len(layout.names):
                raise ValueError(
                    f"a per-tensor inner_lr needs one rate per trainable parameter tensor "
                    f"({len(layout.names)}: {list(layout.names)}), got {len(inner_lr)}")
            raw = list(inner_lr)
        else:
            raw = None
        self.sizes: Optional[Tuple[int, ...]] = (
            None if raw is None else tuple(s.numel() for s in layout.shapes))
        self.values: Tuple[torch.Tensor, ...] = tuple(
            _as_rate(v, dtype, device) for v in ([inner_lr] if raw is None else raw))

    @property
    def per_tensor(self) -> bool:
        return self.sizes is not None

    @property
    def requires_grad(self) -> bool:
        return any(v.requires_grad for v in self.values)

    def expand(self, values: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """α as a 0-dim tensor, or as a ``[P]`` vector for per-tensor rates (differentiable)."""
        values = self.values if values is None else values
        values = [v.to(self.dtype) for v in values]
        if self.sizes is None:
            return values[0]
        return torch.cat([v.reshape(1).expand(n) for v, n in zip(values, self.sizes)])


def _as_rate(value, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.dim() > 0):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"a learning-rate tensor must be a floating-point scalar, "
                             f"got shape {tuple(value.shape)} and dtype {value.dtype}")
        if value.device != device:
            raise ValueError(f"a learning-rate tensor is on {value.device} but the model is on {device}")
        return value.reshape(())
    return torch.tensor(check_positive("inner_lr", value, INNER_LR_RULE), dtype=dtype, device=device)
