"""imaml_ext: fast, small meta-gradients for gradient-based meta-learning.

Public API: :func:`imaml`, :func:`maml` and :func:`reptile_grad`, their
result :class:`Adapted`, the batched solvers :func:`cg` and :func:`hvp`, the
linear solvers :class:`CG` and :class:`Neumann` of iMAML's backward pass, the
fused vector ops in :mod:`imaml_ext.ops`, :func:`backend`, which says
which implementation of those ops runs, and :mod:`imaml_ext.distributed`
(a meta-batch split over processes, meta-gradients summed in one
collective).  ARCHITECTURE.md follows one meta-gradient through the modules.
"""
from . import distributed, ops
from ._build import backend
from .adapted import Adapted
from .finite import NonFiniteLossError
from .hvp import hvp, make_hvp
from .implicit import imaml
from .solvers import CG, CGResult, Neumann, cg
from .unrolled import maml, reptile_grad

__version__ = "0.1.0"

__all__ = ["imaml", "maml", "reptile_grad", "NonFiniteLossError", "Adapted", "cg", "CGResult", "CG",
           "Neumann", "hvp", "make_hvp", "ops", "distributed", "backend", "__version__"]
