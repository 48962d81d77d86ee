"""The metrics file of a run (``metrics.jsonl``): writing it during training, reading it for plots.

One JSON object per line: ``{"split": "train", "step", "window", "loss",
"acc", "seconds", "method"}`` — loss and accuracy averaged over the
``window`` steps ending at ``step`` (the steps since the previous train
line: usually the logging cadence, fewer before a checkpoint taken off the
cadence), ``acc`` null for regression, ``seconds`` the training wall time so
far — and, with validation, ``{"split": "val", "step", "loss", "acc",
"acc_ci95" (classification) or "loss_ci95" (regression), "seconds",
"method"}``.  The train lines' windows tile the steps: each line's
``step`` minus the previous train line's is its ``window``.

Training lines of iMAML runs also carry the implicit gradient's diagnostics
of the meta-step at which the line is written
(:func:`imaml_ext.diagnostics.summary`): ``residual_median`` and
``residual_max`` (relative stationarity residual of the inner problem over
the meta-batch's tasks), ``nonpositive_tasks`` (tasks whose backward CG
met pᵀAp ≤ 0) and ``min_rayleigh`` (smallest pᵀAp/pᵀp it saw).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..data.paths import atomic_file

__all__ = ["METRICS_NAME", "MetricsLogger", "read_metrics", "metrics_file"]

METRICS_NAME = "metrics.jsonl"


def metrics_file(path: os.PathLike) -> Path:
    """``path`` itself, or ``path/metrics.jsonl`` for a run folder."""
    path = Path(path)
    return path / METRICS_NAME if path.is_dir() else path


class MetricsLogger:
    """Appends metric records to a run's metrics file, averaging the training steps between lines.

    :meth:`resume_at` keeps the lines up to a checkpoint's step (those after
    it are written again when the steps are replayed) or, for a new run,
    starts an empty file; lines that are not complete records (the last
    line of a process killed mid-write) are moved aside to
    ``metrics.jsonl.damaged-<time>`` with a message.  Inside ``with logger:`` :meth:`add` accumulates a
    step's loss and accuracy, :meth:`log_train` writes their mean, and
    :meth:`write` any record; without a progress bar (``echo``) each record
    is also printed.
    """

    def __init__(self, path: os.PathLike, method: str, echo: bool = False):
        self.path, self.method, self.echo = Path(path), method, echo
        self._file = None
        self._loss: Any = 0.0
        self._acc: Any = 0.0
        self._n = 0
        self._classification = False

    def resume_at(self, step: Optional[int]) -> None:
        """Keep the lines up to ``step`` (None: a new run, no lines); move damaged lines aside."""
        if step is None:
            if self.path.exists():
                self.path.unlink()
            return
        if not self.path.is_file():
            return
        kept, damaged = [], []
        for line in self.path.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            record = _parse(line)
            if record is None:
                damaged.append(line)
            elif record["step"] <= step:
                kept.append(line)
        if damaged:
            aside = self.path.with_name(f"{self.path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            with atomic_file(aside) as tmp:
                tmp.write_text("".join(line + "\n" for line in damaged))
            print(f"{self.path}: {len(damaged)} damaged line(s) (an interrupted write) moved to {aside}; "
                  f"the {len(kept)} complete line(s) up to step {step} are kept", file=sys.stderr)
        with atomic_file(self.path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))

    def __enter__(self) -> "MetricsLogger":
        self._file = open(self.path, "a")
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()
        self._file = None

    def write(self, record: Dict[str, Any]) -> Dict[str, Any]:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.echo:
            print(json.dumps(record), flush=True)
        return record

    @property
    def pending(self) -> int:
        """Training steps added since the last train line."""
        return self._n

    def add(self, loss: torch.Tensor, acc: Optional[torch.Tensor]) -> None:
        """One training step's loss and accuracy (None for regression), left on the device."""
        self._loss = loss + self._loss
        self._acc = (acc if acc is not None else 0.0) + self._acc
        self._classification = acc is not None
        self._n += 1

    def log_train(self, step: int, seconds: float, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Write the mean loss and accuracy of the steps since the last line (and the
        ``extra`` fields, e.g. the diagnostics of this step), and start a new window."""
        record = self.write({"split": "train", "step": step, "window": self._n, "loss": float(self._loss) / self._n,
                             "acc": float(self._acc) / self._n if self._classification else None,
                             "seconds": round(seconds, 3), "method": self.method, **(extra or {})})
        self._loss, self._acc, self._n = 0.0, 0.0, 0
        return record

    def log_val(self, step: int, seconds: float, scores: Dict[str, Any]) -> Dict[str, Any]:
        """Write a validation line from :func:`~imaml_ext.training.evaluate.evaluate`'s scores."""
        key = "acc" if "acc" in scores else "loss"
        return self.write({"split": "val", "step": step, "loss": scores["loss"]["mean"],
                           "acc": scores["acc"]["mean"] if "acc" in scores else None,
                           f"{key}_ci95": scores[key]["ci95"], "seconds": round(seconds, 3),
                           "method": self.method})


def _is_record(record: Any) -> bool:
    """Whether a decoded line is a complete metrics record."""
    return isinstance(record, dict) and "step" in record and "loss" in record


def _parse(line: str) -> Optional[Dict[str, Any]]:
    """The record of one line, or None if it is not JSON or not a complete metrics record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if _is_record(record) else None


def read_metrics(path: os.PathLike) -> Dict[str, List[dict]]:
    """The records of a metrics JSONL file, grouped by ``split`` (train / val), in file order.

    Every train record has a ``window`` (steps it averages); files written
    before that field existed get the distance to the previous train line.
    A last line that is not JSON (being written, or cut by a crash) is left out.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    groups: Dict[str, List[dict]] = {}
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not a metrics file: it is not text (byte {exc.start} is not UTF-8); "
                         f"give the {METRICS_NAME} of an imaml-ext train run, or its run folder") from None
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break  # a last line being written, or cut by a crash
            raise ValueError(f"{path}:{number} is not JSON ({exc})") from None
        if not _is_record(record):
            raise ValueError(f"{path}:{number} lacks 'step' or 'loss'; is this a metrics.jsonl of imaml-ext train?")
        split = record.get("split", "train")
        if split == "train" and "window" not in record:
            previous = groups.get("train", [])
            record["window"] = record["step"] - (previous[-1]["step"] if previous else 0)
        groups.setdefault(split, []).append(record)
    if not groups:
        raise ValueError(f"{path} holds no metrics")
    return groups
