"""imaml_ext: fast, small meta-gradients for gradient-based meta-learning.

Public API: :func:`imaml`, :func:`maml` and :func:`reptile_grad`, their
result :class:`Adapted` (with per-task diagnostics and
:class:`ImplicitGradientWarning`, :mod:`imaml_ext.diagnostics`), the batched solvers :func:`cg` and :func:`hvp`, the
linear solvers :class:`CG` and :class:`Neumann` of iMAML's backward pass, the
fused vector ops in :mod:`imaml_ext.ops`, the ``batching=`` modes
(:data:`BATCHING_MODES`, :class:`BatchingError`, :class:`CompileError`), :func:`backend`, which says
which implementation of those ops runs, and :mod:`imaml_ext.distributed`
(a meta-batch split over processes, meta-gradients summed in one
collective).  ARCHITECTURE.md follows one meta-gradient through the modules.
"""
from . import cpu_malloc, distributed, ops
from ._build import backend
from .adapted import Adapted
from .batching import BATCHING_MODES, BatchingError
from .compiled import CompileError
from .diagnostics import ImplicitGradientWarning
from .finite import NonFiniteLossError
from .hvp import hvp, make_hvp
from .implicit import imaml
from .solvers import CG, CGResult, Neumann, cg
from .unrolled import maml, reptile_grad

__version__ = "0.1.0"

__all__ = ["imaml", "maml", "reptile_grad", "NonFiniteLossError", "ImplicitGradientWarning", "BatchingError", "CompileError", "BATCHING_MODES", "Adapted", "cg", "CGResult", "CG",
           "Neumann", "hvp", "make_hvp", "ops", "distributed", "backend", "__version__"]
