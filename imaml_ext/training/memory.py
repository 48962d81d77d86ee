"""Memory of one meta-step, estimated from the shapes before training starts, against what the machine has.

:func:`estimate_step_bytes` is an analytical estimate: the parameter copies
a method keeps per task, plus the activations autograd keeps, measured per
example by running the model once on one example and multiplied by the examples of a meta-batch and
the inner-loop graphs the method keeps:

=====================  ==========================  ============================
method                 parameter copies per task   support-set graphs kept
=====================  ==========================  ============================
imaml-gd, imaml-hf     6 (φ, gradient, CG x r p Hp)  1 (one step, or one HVP)
maml (full)            K + 2                       K
checkpointed-maml      2·√K + 2                    2·√K
fomaml, reptile        4                           1
=====================  ==========================  ============================

Each kept support graph costs about 3× the forward activations of the T·n
support examples (forward values, their gradients, the HVP's tangents); the
query pass 2× those of the T·m query examples.  The estimate is meant for
the order of magnitude ("this needs 700 GiB"), not to the percent.

:func:`available_bytes` is what the device can still give: on CUDA the free
memory (``torch.cuda.mem_get_info``); on Linux the smaller of
``MemAvailable`` (/proc/meminfo) and the cgroup's limit less its usage;
None where unknown.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..validation import probe_forward
from .methods import get_method

__all__ = ["activation_bytes_per_example", "estimate_step_bytes", "available_bytes", "format_bytes"]


def activation_bytes_per_example(model: nn.Module, x_one: torch.Tensor) -> int:
    """Bytes of the outputs of every leaf module (and the input) for one example
    ``x_one`` [1, ...], from one forward pass on it (:func:`~imaml_ext.validation.probe_forward`);
    0 if the model cannot run on one example."""
    total = [x_one.numel() * x_one.element_size()]

    def count(module, inputs, output):
        if isinstance(output, torch.Tensor):
            total[0] += output.numel() * output.element_size()

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        ran = probe_forward(model, x_one) is not None
    finally:
        for hook in hooks:
            hook.remove()
    return total[0] if ran else 0


def estimate_step_bytes(method: str, inner_steps: int, model: nn.Module, tasks: int,
                        support_x: torch.Tensor, query_x: torch.Tensor) -> int:
    """Estimated peak bytes of one meta-step of ``method`` on ``tasks`` tasks, one
    task's support inputs ``support_x`` [n, ...] and query inputs ``query_x`` [m, ...]
    (table in the module docstring)."""
    params = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    per_example = activation_bytes_per_example(model, support_x[:1])
    spec = get_method(method)
    mode = spec.options.get("mode")
    if spec.implicit:
        copies, graphs = 6, 1
    elif mode == "full" and not spec.reptile:
        copies, graphs = inner_steps + 2, max(inner_steps, 1)
    elif mode == "checkpointed":
        root = math.ceil(math.sqrt(max(inner_steps, 1)))
        copies, graphs = 2 * root + 2, 2 * root
    else:
        copies, graphs = 4, 1
    support = 3 * graphs * tasks * support_x.shape[0] * per_example
    query = 2 * tasks * query_x.shape[0] * per_example
    return copies * tasks * param_bytes + support + query


def _cgroup_room() -> Optional[int]:
    """The cgroup v2 memory limit less current usage, if this process is limited."""
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((base / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def _mem_available() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory ``device`` can still give (module docstring); None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    known = [b for b in (_mem_available(), _cgroup_room()) if b is not None]
    return min(known) if known else None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
