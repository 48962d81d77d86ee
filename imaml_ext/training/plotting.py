"""Figures: learning curves from metrics JSONL files, and the demo's sinusoid fits.

Needs matplotlib, part of the ``train`` extra (``pip install 'imaml_ext[train]'``);
it is imported only when a figure is drawn, with the Agg (file-only) backend.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from .metrics import METRICS_NAME, read_metrics

__all__ = ["MissingDependencyError", "require_matplotlib", "read_metrics", "plot_curves", "plot_fits", "png_path"]


class MissingDependencyError(ImportError):
    """An optional dependency is not installed."""


def require_matplotlib():
    """``matplotlib.pyplot`` on the Agg backend, or MissingDependencyError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError(
            "plots need matplotlib, part of the 'train' extra: pip install 'imaml_ext[train]' "
            "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def png_path(out: os.PathLike) -> Path:
    """Where a figure saved as ``out`` ends up: ``out`` itself, or ``out.png`` when it has no
    suffix (matplotlib adds one)."""
    out = Path(out)
    return out if out.suffix else out.with_name(out.name + ".png")


def plot_curves(paths: Sequence[os.PathLike], out: os.PathLike,
                labels: Optional[Sequence[str]] = None) -> Path:
    """Query loss and (if logged) accuracy against meta-step, one line per run
    (validation dashed with markers), saved as a PNG at ``out``
    (``out.png`` if it has no suffix), whose path it returns; for runs that
    logged the implicit gradient's diagnostics (iMAML), a panel with the
    median (solid) and largest (dotted) relative inner residual and, on a
    second axis, the number of tasks whose CG met pᵀAp ≤ 0 (crosses)."""
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} metrics files")
    runs = [read_metrics(p) for p in paths]
    labels = list(labels) if labels is not None else [_label(Path(p)) for p in paths]
    has_acc = any(r.get("acc") is not None for groups in runs for recs in groups.values() for r in recs)
    has_diag = any(r.get("residual_median") is not None for groups in runs for r in groups.get("train", []))
    plt = require_matplotlib()
    import matplotlib.ticker as ticker
    panels = 1 + has_acc + has_diag
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    keys = [("loss", "query loss")] + ([("acc", "query accuracy")] if has_acc else [])
    for ax, (key, title) in zip(axes[0], keys):
        for index, (groups, label) in enumerate(zip(runs, labels)):
            color = f"C{index % 10}"
            for split, records in sorted(groups.items(), key=lambda kv: kv[0] != "train"):
                points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
                if not points:
                    continue
                steps, values = zip(*points)
                style = dict(linestyle="-") if split == "train" else dict(linestyle="--", marker="o", markersize=3)
                ax.plot(steps, values, color=color, label=f"{label} ({split})", **style)
        ax.set_xlabel("meta-step")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if key == "loss":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
            ax.yaxis.set_minor_formatter(ticker.ScalarFormatter())
    if has_diag:
        _plot_diagnostics(axes[0][-1], runs, labels)
    axes[0][1 if has_acc else 0].legend(fontsize=8)
    fig.tight_layout()
    out = png_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _plot_diagnostics(ax, runs, labels) -> None:
    """The inner residual and the non-positive-curvature counts of each run's training lines."""
    counts = ax.twinx()
    for index, (groups, label) in enumerate(zip(runs, labels)):
        records = [r for r in groups.get("train", []) if r.get("residual_median") is not None]
        if not records:
            continue
        color, steps = f"C{index % 10}", [r["step"] for r in records]
        ax.plot(steps, [r["residual_median"] for r in records], color=color, label=f"{label} median")
        ax.plot(steps, [r["residual_max"] for r in records], color=color, linestyle=":", label=f"{label} max")
        counts.plot(steps, [r.get("nonpositive_tasks", 0) for r in records], color=color, marker="x",
                    linestyle="none", markersize=4)
    ax.set_yscale("log")
    ax.set_xlabel("meta-step")
    ax.set_ylabel("inner residual ‖∇F(φ)‖/‖∇F(θ)‖")
    counts.set_ylabel("tasks with pᵀAp ≤ 0 (x)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _label(path: Path) -> str:
    """A run's name: its folder for ``<run>/metrics.jsonl``, else the file name."""
    return path.parent.name if path.name == METRICS_NAME and path.parent.name else path.stem


def plot_fits(x_grid: torch.Tensor, truth: torch.Tensor, support_x: torch.Tensor, support_y: torch.Tensor,
              fits: Dict[str, torch.Tensor], out: os.PathLike, title: str = "") -> Path:
    """Sinusoid fits of several methods on a few tasks, one panel per task.

    x_grid [G], truth [T, G], support_x / support_y [T, K], fits
    {method: [T, G]}; saved as a PNG at ``out``.
    """
    plt = require_matplotlib()
    tasks = truth.shape[0]
    fig, axes = plt.subplots(1, tasks, figsize=(3.6 * tasks, 3.2), squeeze=False, sharey=True)
    for t, ax in enumerate(axes[0]):
        ax.plot(x_grid, truth[t], color="black", linewidth=2, label="true function")
        for index, (name, values) in enumerate(fits.items()):
            ax.plot(x_grid, values[t], color=f"C{index}", label=name)
        ax.scatter(support_x[t], support_y[t], color="black", marker="^", zorder=5, label="support points")
        ax.set_xlabel("x")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("y")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    out = png_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
