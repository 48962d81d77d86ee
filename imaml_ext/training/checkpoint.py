"""Training checkpoints: atomic writes, checked reads, and the random-number state.

A checkpoint is a dict saved with ``torch.save`` that loads with
``torch.load(..., weights_only=True)`` (tensors, numbers, strings, lists,
tuples and dicts only):

=============  ====================================================================
key            content
=============  ====================================================================
``format``     :data:`FORMAT`
``config``     :meth:`TrainConfig.to_dict() <imaml_ext.training.experiment.TrainConfig.to_dict>`
``run``        :meth:`RunOptions.stored() <imaml_ext.training.experiment.RunOptions.stored>`, reused on
               resume (absent in older checkpoints)
``step``       meta-steps completed
``seconds``    training wall time so far (all resumed parts together)
``model``      ``model.state_dict()``
``optimizer``  the outer optimizer's ``state_dict()``
``sampler``    the training task sampler's ``state_dict()``
``rng``        :func:`capture_rng`: torch (CPU and CUDA), NumPy and Python states
=============  ====================================================================
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np
import torch

from ..data.paths import atomic_file

__all__ = ["FORMAT", "CheckpointError", "capture_rng", "restore_rng", "save_checkpoint",
           "load_checkpoint", "find_checkpoint", "CHECKPOINT_NAME"]

FORMAT = "imaml_ext-train-1"
CHECKPOINT_NAME = "checkpoint.pt"

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or not an imaml_ext training checkpoint."""


def capture_rng() -> Dict[str, Any]:
    """The states of torch's CPU (and, if initialised, CUDA) generators, NumPy's
    global generator and Python's ``random``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    """Undo :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: PathLike, payload: Dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (:func:`imaml_ext.data.paths.atomic_file`):
    a reader never sees a half-written checkpoint; an interrupted write leaves the old one."""
    path = Path(path)
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)
    return path


def find_checkpoint(path: PathLike) -> Path:
    """``path`` itself, or ``path/checkpoint.pt`` for a run folder."""
    path = Path(path)
    candidate = path / CHECKPOINT_NAME if path.is_dir() else path
    if not candidate.is_file():
        where = f"{path} is a folder without {CHECKPOINT_NAME}" if path.is_dir() else f"no file {path}"
        raise CheckpointError(f"checkpoint not found: {where}")
    return candidate


def load_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (a file or a run
    folder) onto the CPU; raises :class:`CheckpointError` if it is not one."""
    file = find_checkpoint(path)
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{file} is not a readable checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not an imaml_ext training checkpoint (format {FORMAT!r})")
    return payload
