"""Detection of non-finite support losses during an inner loop, shared by all methods.

:class:`FiniteWatch` keeps, on the device, the first inner step at which each
task's loss was NaN or infinite, so the loop itself never waits for the host;
:meth:`FiniteWatch.raise_if_bad` is called once after the loop and names the
offending tasks and steps.
"""
from __future__ import annotations

import torch

__all__ = ["NonFiniteLossError", "FiniteWatch"]

DEFAULT_HINT = "lower inner_lr, check the data and loss_fn, or clip with max_grad_norm"


class NonFiniteLossError(FloatingPointError):
    """The support loss became NaN or infinite during the inner loop."""


class FiniteWatch:
    """Records, on the device, the first inner step at which each task's loss was not finite."""

    def __init__(self, num_tasks: int, device: torch.device):
        self.first_bad = torch.full((num_tasks,), -1, dtype=torch.int64, device=device)

    def update(self, step: int, losses: torch.Tensor) -> None:
        """losses ``[T]`` of inner step ``step``."""
        bad = ~torch.isfinite(losses) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, step, self.first_bad)

    def raise_if_bad(self, solver: str, hint: str = DEFAULT_HINT) -> None:
        """Raise :class:`NonFiniteLossError` naming up to 8 tasks and their first bad step."""
        bad = (self.first_bad >= 0).nonzero().flatten().tolist()
        if bad:
            where = ", ".join(f"task {t} at step {self.first_bad[t].item()}" for t in bad[:8])
            more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
            raise NonFiniteLossError(
                f"{solver}: the support loss became non-finite ({where}{more}); {hint}")
