"""Where datasets live on disk, their subsets, the errors raised when one is missing or damaged, and output files
(checked before work starts, written atomically).

A *data root* holds one folder per dataset (``<root>/omniglot``,
``<root>/miniimagenet``).  The root is, in order of precedence, the ``root``
argument of a loader, the environment variable ``IMAML_EXT_DATA``, or
``~/.cache/imaml_ext``.  A loader also accepts the dataset folder itself as
``root``.
"""
from __future__ import annotations

import os
import pickle
import secrets
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

__all__ = ["ENV_VAR", "SUBSETS", "DatasetNotFoundError", "DamagedFileError", "reading", "check_subset",
           "data_root", "dataset_dirs", "atomic_file", "partial_files", "check_output_path"]

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


class DamagedFileError(ValueError):
    """A data file is there but cannot be read: truncated, or not the format its name says.

    The message names the file, what went wrong and how to get a good copy;
    ``path`` is the file."""

    def __init__(self, path: PathLike, problem: str, fix: str):
        self.path = Path(path)
        super().__init__(f"{self.path} is damaged ({problem}). {fix}")


# What the readers of zip, npz, pickle and image files raise on a truncated or foreign file.
_DAMAGE = (zipfile.BadZipFile, zlib.error, EOFError, pickle.UnpicklingError, OSError, ValueError)


@contextmanager
def reading(path: PathLike, fix: str) -> Iterator[None]:
    """Inside the block, a reader's error about the content of ``path`` (a
    truncated zip, random bytes, a broken image) becomes a
    :class:`DamagedFileError` saying ``fix``; a missing file or a permission
    problem stays what it is."""
    try:
        yield
    except (FileNotFoundError, PermissionError, IsADirectoryError, DamagedFileError):
        raise
    except _DAMAGE as exc:
        problem = str(exc) or type(exc).__name__
        if "allow_pickle" in problem:  # NumPy's guess for bytes that are neither .npy nor .npz
            problem = "not an .npz archive"
        raise DamagedFileError(path, problem, fix) from exc


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
    to write; when the block ends without an error, that file is flushed to
    disk and renamed over ``path``, else it is removed.  A reader never sees
    a half-written file; a failed write leaves the old one.  The file's mode
    follows the umask, like any file ``open`` creates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary(path)
    try:
        yield tmp
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


def _create_temporary(path: Path) -> Path:
    """A new empty file ``.<name>.<random>.part`` beside ``path``, created with
    mode 0666 less the umask (``tempfile.mkstemp`` would make it 0600)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{_PARTIAL_SUFFIX}"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {path}")


def check_output_path(path: PathLike, what: str, folder: bool = False) -> Path:
    """``path`` if a file (``folder``: a folder of files) can be written there,
    else a ValueError naming ``what`` (e.g. ``"--out"``) and the problem: the
    path is a folder (a file), lies under a file, or the nearest existing
    folder above it is not writable.  Creates nothing."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder; choose another {what}")
    if not folder and path.is_dir():
        raise ValueError(f"{what} {path} is a folder, not a file; choose a file name")
    existing = path if folder else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {path} lies under {existing}, which is a file, not a folder; "
                         f"choose another {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: no permission to create files in {existing}; choose another {what}")
    return path
