"""Where datasets live on disk, and the error raised when one is missing.

A *data root* holds one folder per dataset (``<root>/omniglot``,
``<root>/miniimagenet``).  The root is, in order of precedence, the ``root``
argument of a loader, the environment variable ``IMAML_EXT_DATA``, or
``~/.cache/imaml_ext``.  A loader also accepts the dataset folder itself as
``root``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

__all__ = ["ENV_VAR", "DatasetNotFoundError", "data_root", "dataset_dirs"]

ENV_VAR = "IMAML_EXT_DATA"

PathLike = Union[str, os.PathLike]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset was not found in any of the folders a loader searched."""

    def __init__(self, dataset: str, looked: Sequence[Tuple[Path, str]], how_to_get: str):
        lines = [f"{dataset} not found. Looked in:"]
        lines += [f"  {path}: {what}" for path, what in looked]
        lines.append(how_to_get)
        lines.append(f"The data root is the `root` argument, else ${ENV_VAR}, else ~/.cache/imaml_ext.")
        super().__init__("\n".join(lines))


def data_root(root: Optional[PathLike] = None) -> Path:
    """The data root: ``root`` if given, else ``$IMAML_EXT_DATA``, else ``~/.cache/imaml_ext``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "imaml_ext"


def dataset_dirs(folder_names: Sequence[str], root: Optional[PathLike] = None) -> List[Path]:
    """Candidate folders of one dataset, most specific first.

    ``<root>/<name>`` for each of ``folder_names``, then ``<root>`` itself (for
    a ``root`` that already is the dataset folder).  The first entry is where a
    download goes.
    """
    base = data_root(root)
    return [base / name for name in folder_names] + [base]
