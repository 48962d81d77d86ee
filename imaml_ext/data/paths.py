"""Where datasets live on disk, their subsets, the error raised when one is missing, and atomic file writes.

A *data root* holds one folder per dataset (``<root>/omniglot``,
``<root>/miniimagenet``).  The root is, in order of precedence, the ``root``
argument of a loader, the environment variable ``IMAML_EXT_DATA``, or
``~/.cache/imaml_ext``.  A loader also accepts the dataset folder itself as
``root``.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

__all__ = ["ENV_VAR", "SUBSETS", "DatasetNotFoundError", "check_subset", "data_root", "dataset_dirs",
           "atomic_file", "partial_files"]

ENV_VAR = "IMAML_EXT_DATA"
SUBSETS = ("train", "val", "test")

PathLike = Union[str, os.PathLike]
_PARTIAL_SUFFIX = ".part"  # atomic_file's temporary files: .<name>.<random>.part


class DatasetNotFoundError(FileNotFoundError):
    """A dataset was not found in any of the folders a loader searched."""

    def __init__(self, dataset: str, looked: Sequence[Tuple[Path, str]], how_to_get: str):
        lines = [f"{dataset} not found. Looked in:"]
        lines += [f"  {path}: {what}" for path, what in looked]
        lines.append(how_to_get)
        lines.append(f"The data root is the `root` argument, else ${ENV_VAR}, else ~/.cache/imaml_ext.")
        super().__init__("\n".join(lines))


def check_subset(subset: str) -> str:
    """``subset`` if it is one of :data:`SUBSETS`, else a ValueError."""
    if subset not in SUBSETS:
        raise ValueError(f"subset={subset!r}; use one of {SUBSETS}")
    return subset


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


@contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """Write ``path`` all at once: yields a temporary path in the same folder
    to write; when the block ends without an error, that file gets the usual
    file mode, is flushed to disk and renamed over ``path``, else it is
    removed.  A reader never sees a half-written file; a failed write leaves
    the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_PARTIAL_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def partial_files(folder: PathLike) -> List[Path]:
    """The temporary files of :func:`atomic_file` in ``folder``: those of writes in progress,
    or left by a process killed mid-write (sorted by name)."""
    return sorted(p for p in Path(folder).glob(f".*{_PARTIAL_SUFFIX}") if p.is_file())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
