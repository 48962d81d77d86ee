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
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np
import torch

from ..data.paths import atomic_file

__all__ = ["FORMAT", "CheckpointError", "capture_rng", "restore_rng", "save_checkpoint",
           "load_checkpoint", "checkpoint_config", "find_checkpoint", "CHECKPOINT_NAME"]

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


_WRITTEN_BY = f"imaml_ext training checkpoints are the {CHECKPOINT_NAME} that `imaml-ext train` writes in its run folder"


def load_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (a file or a run
    folder) onto the CPU; raises :class:`CheckpointError`, naming the file and
    what is wrong with it (empty, not a torch.save archive, truncated, other
    objects, another format), if it is not one."""
    file = find_checkpoint(path)
    if file.stat().st_size == 0:
        raise CheckpointError(f"{file} is empty (a copy or write that did not finish?); {_WRITTEN_BY}")
    if not zipfile.is_zipfile(file):
        with open(file, "rb") as f:
            zip_start = f.read(4) == b"PK\x03\x04"
        if zip_start:  # the archive's directory, written last, is missing
            raise CheckpointError(f"{file} is damaged or truncated (its end is missing: a copy or write that "
                                  f"did not finish?); {_WRITTEN_BY}")
        raise CheckpointError(f"{file} is not a checkpoint: not a torch.save archive; {_WRITTEN_BY}")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc):
            raise CheckpointError(f"{file} is damaged ({exc}); {_WRITTEN_BY}") from None
        raise CheckpointError(f"{file} is not an imaml_ext training checkpoint: it holds objects other than "
                              f"tensors, numbers, strings and containers; {_WRITTEN_BY}") from None
    except Exception as exc:  # noqa: BLE001 - a truncated or altered archive fails in many ways
        raise CheckpointError(f"{file} is damaged or truncated ({type(exc).__name__}: {exc}); "
                              f"{_WRITTEN_BY}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{file} is not an imaml_ext training checkpoint (format {FORMAT!r}, "
                              f"found {found!r}); {_WRITTEN_BY}")
    missing = [key for key in _KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"{file} is an incomplete checkpoint: it lacks {missing}")
    return payload


_KEYS = ("config", "step", "seconds", "model", "optimizer", "sampler", "rng")


def checkpoint_config(payload: Dict[str, Any], file: PathLike):
    """The :class:`~imaml_ext.training.experiment.TrainConfig` stored in a
    checkpoint's ``payload`` read from ``file``; a configuration this version
    does not accept (an unknown key, a value out of range) is a :class:`CheckpointError`."""
    from .experiment import TrainConfig
    try:
        return TrainConfig.from_dict(dict(payload["config"]))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{file} holds a configuration this version of imaml_ext cannot use: {exc} "
                              f"(was it written by another version?)") from None
