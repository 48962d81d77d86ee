"""Omniglot (Lake, Salakhutdinov & Tenenbaum, Science 2015): files, cache, split, classes.

Files
-----
The dataset folder (``<root>/omniglot``, see :mod:`imaml_ext.data.paths`)
holds any of, read in this order:

* ``omniglot{S}.npz``: the packed cache (S = image side, 28 by default);
* ``images_background.zip`` and ``images_evaluation.zip``: the official zips;
* ``images_background/`` and ``images_evaluation/``: the zips extracted.

In a zip or folder an image is ``images_<set>/<Alphabet>/characterNN/<id>_<drawer>.png``,
a binary 105×105 PNG; ``<id>`` is the character's 4-digit id, ``<drawer>`` 01..20.
Reading from zips or folders writes the cache beside them when the folder is
writable.

Cache format
------------
``omniglot{S}.npz`` loads with ``np.load(path, allow_pickle=False)``; for each
set in (``background``, ``evaluation``):

==========================  =====  =================  ================================
key                         dtype  shape              content
==========================  =====  =================  ================================
``{set}``                   uint8  [C_set, 20, S, S]  the images
``{set}_alphabet``          str    [C_set]            alphabet folder name
``{set}_character``         str    [C_set]            ``characterNN``
``{set}_char_id``           int16  [C_set]            the 4-digit id in the file names
``{set}_alphabet_names``    str    [A_set]            sorted alphabet names
``info``                    str    []                 provenance text
==========================  =====  =================  ================================

C_set = 964 / 659 and A_set = 30 / 20 for background / evaluation.  Axis 0 is
sorted by (alphabet, character), axis 1 is the drawer (_01.._20).  255 is
paper, 0 is ink.  An image is resampled as
``Image.open(png).convert("L").resize((S, S), Image.Resampling.LANCZOS)``
(Pillow): the binary image becomes 0/255 first.  Built from the official
files this reproduces the shared ``omniglot28.npz`` exactly.

Model-facing convention
-----------------------
:class:`Omniglot` inverts the pixels: ``images`` is uint8 [C, 20, 1, S, S]
with ink = 255 and paper = 0; :class:`~imaml_ext.data.sampler.TaskSampler`
(through :func:`~imaml_ext.data.sampler.to_float`) turns it into float32
``x / 255``, i.e. ``1 - pixel / 255`` in [0, 1] with ink = 1, the convention
of the MAML and iMAML code.

Character split
---------------
All 1623 characters (background and evaluation pooled) are sorted by
(alphabet, character) name and permuted by
``np.random.RandomState(split_seed).permutation(1623)``, whose stream NumPy
keeps fixed across versions and platforms: the first 1200 are training
characters, the other 423 test characters.  The split depends on the names
only, never on the order a filesystem lists them, so training and evaluation
share it.  ``val_classes=V`` moves the last V of the 1200 training characters
into a validation subset.  ``split="lake"`` is Lake's split instead: the 964
background characters train, the 659 evaluation characters test, and a
validation subset is carved from the background characters the same way.
Rotations by multiples of 90° are applied after the split: each rotated
character is a class of its own, in the same subset as its character.
"""
from __future__ import annotations

import hashlib
import io
import re
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ._pil import pil_image
from .paths import DamagedFileError, DatasetNotFoundError, PathLike, atomic_file, check_subset, dataset_dirs, reading

__all__ = [
    "DEFAULT_BASE_URL", "SETS", "DRAWERS", "Omniglot", "OmniglotArrays",
    "cache_name", "read_omniglot_set", "read_omniglot_files", "read_omniglot_npz",
    "write_npz_atomic", "download_omniglot", "load_omniglot_arrays", "omniglot_split",
    "rotate_classes",
]

DEFAULT_BASE_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
SETS = ("background", "evaluation")
DRAWERS = 20
SPLITS = ("standard", "lake")

_PNG_NAME = re.compile(r"^(\d+)_(\d+)\.png$")
_HOW_TO_GET = (
    "Get it with Omniglot(..., download=True) (or load_omniglot_arrays(download=True)), "
    "or copy images_background.zip and images_evaluation.zip (or omniglot28.npz) "
    "into one of these folders.")


def _fetch_command(folder: Path) -> str:
    """The shell command that downloads the official zips missing from ``folder``."""
    return (f"python -c \"from imaml_ext.data.omniglot import download_omniglot; "
            f"download_omniglot('{folder}')\"")


def _refetch_zip(path: Path) -> str:
    return f"Delete it and fetch it again: {_fetch_command(path.parent)} (or copy a good {path.name} there)."


def _rebuild_cache(path: Path) -> str:
    return (f"Delete it: the next load rebuilds it from images_background.zip and images_evaluation.zip "
            f"in {path.parent} (if they are not there: {_fetch_command(path.parent)}).")


def cache_name(image_size: int = 28) -> str:
    """File name of the packed cache for ``image_size`` × ``image_size`` images."""
    return f"omniglot{image_size}.npz"


# --------------------------------------------------------------------------- files

def _zip_pngs(path: Path) -> List[Tuple[Tuple[str, ...], bytes]]:
    """(path parts, file bytes) of each PNG in a zip, skipping hidden and macOS entries."""
    found = []
    with reading(path, _refetch_zip(path)), zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            parts = PurePosixPath(info.filename).parts
            if info.is_dir() or not parts[-1].lower().endswith(".png"):
                continue
            if any(p.startswith(".") or p == "__MACOSX" for p in parts):
                continue
            found.append((parts, archive.read(info)))
    return found


def _folder_pngs(path: Path) -> List[Tuple[Tuple[str, ...], bytes]]:
    """(path parts, file bytes) of each ``<Alphabet>/<character>/*.png`` under a folder."""
    return [(file.relative_to(path).parts, file.read_bytes())
            for file in sorted(path.glob("*/*/*.png"))
            if not any(p.startswith(".") for p in file.relative_to(path).parts)]


def read_omniglot_set(source: PathLike, image_size: int = 28) -> Dict[str, np.ndarray]:
    """Read one Omniglot set from its zip or its extracted folder.

    Args:
        source: ``images_<set>.zip`` or the folder ``images_<set>/``.
        image_size: side S of the returned images (105 keeps the originals).

    Returns:
        The cache's arrays of that set, keys without the set prefix:
        ``images`` uint8 [C, 20, S, S] (255 = paper), ``alphabet`` [C],
        ``character`` [C], ``char_id`` int16 [C], ``alphabet_names`` [A];
        characters sorted by (alphabet, character), drawings by drawer.
    """
    source = Path(source)
    entries = _zip_pngs(source) if source.is_file() else _folder_pngs(source)
    found: Dict[Tuple[str, str], Dict[int, Tuple[int, bytes, str]]] = {}
    for parts, data in entries:
        if len(parts) < 3:
            raise ValueError(f"{source}: PNG {'/'.join(parts)} is not inside "
                             f"<Alphabet>/characterNN/; is this an Omniglot images_<set> zip or folder?")
        alphabet, character, name = parts[-3:]
        match = _PNG_NAME.match(name)
        if match is None:
            raise ValueError(f"{source}: {'/'.join(parts)} is not named <id>_<drawer>.png")
        char_id, drawer = int(match.group(1)), int(match.group(2))
        drawings = found.setdefault((alphabet, character), {})
        if drawer in drawings:
            raise ValueError(f"{source}: {alphabet}/{character} has drawer {drawer:02d} twice")
        drawings[drawer] = (char_id, data, "/".join(parts))
    if not found:
        raise ValueError(f"no Omniglot PNGs (<Alphabet>/characterNN/<id>_<drawer>.png) in {source}")

    Image = pil_image()
    fix = (_refetch_zip(source) if source.is_file() else
           f"Extract {source.name}.zip into {source.parent} again, or put the zip there "
           f"({_fetch_command(source.parent)}).")
    keys = sorted(found)
    images = np.empty((len(keys), DRAWERS, image_size, image_size), dtype=np.uint8)
    char_ids = np.empty(len(keys), dtype=np.int16)
    for i, key in enumerate(keys):
        drawings = found[key]
        if sorted(drawings) != list(range(1, DRAWERS + 1)):
            raise ValueError(f"{source}: {'/'.join(key)} has drawers {sorted(drawings)}, "
                             f"expected 01..{DRAWERS}; the set is incomplete, fetch it again")
        ids = {char_id for char_id, _, _ in drawings.values()}
        if len(ids) != 1:
            raise ValueError(f"{source}: {'/'.join(key)} mixes character ids {sorted(ids)}")
        char_ids[i] = ids.pop()
        for drawer, (_, data, member) in drawings.items():
            with reading(source / member if source.is_dir() else f"{source}:{member}", fix):
                image = Image.open(io.BytesIO(data)).convert("L")
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
            images[i, drawer - 1] = np.asarray(image)
    alphabets = np.array([a for a, _ in keys])
    return {
        "images": images,
        "alphabet": alphabets,
        "character": np.array([c for _, c in keys]),
        "char_id": char_ids,
        "alphabet_names": np.array(sorted(set(alphabets.tolist()))),
    }


def _find_sources(folder: Path) -> Dict[str, Path]:
    """The zip (preferred) or extracted folder of each set present in ``folder``."""
    sources = {}
    for set_name in SETS:
        for candidate in (folder / f"images_{set_name}.zip", folder / f"images_{set_name}"):
            if candidate.exists():
                sources[set_name] = candidate
                break
    return sources


def read_omniglot_files(folder: PathLike, image_size: int = 28) -> Dict[str, np.ndarray]:
    """Read both sets from the zips or folders in ``folder`` into the cache's arrays.

    Returns the dict that :func:`write_npz_atomic` stores as ``omniglot{S}.npz``
    (format in the module docstring).
    """
    folder = Path(folder)
    sources = _find_sources(folder)
    missing = [s for s in SETS if s not in sources]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks " + " and ".join(f"images_{s}.zip (or the folder images_{s}/)" for s in missing))
    arrays: Dict[str, np.ndarray] = {}
    for set_name in SETS:
        part = read_omniglot_set(sources[set_name], image_size)
        arrays[set_name] = part.pop("images")
        arrays.update({f"{set_name}_{key}": value for key, value in part.items()})
    arrays["info"] = np.array(
        f"Omniglot (Lake et al. 2015), MIT license, read by imaml_ext from "
        f"{', '.join(sources[s].name for s in SETS)}. Axis 0 = characters sorted by "
        f"(alphabet, character) name; axis 1 = drawer _01.._{DRAWERS}; uint8, 255 = paper, "
        f"0 = ink. {image_size}x{image_size}: Image.open(png).convert('L')"
        + ("" if image_size == 105 else f".resize(({image_size}, {image_size}), LANCZOS)") + ".")
    return arrays


def write_npz_atomic(path: PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """Save ``arrays`` as a compressed .npz at ``path``: a temporary file in
    the same folder, renamed over ``path`` once complete."""
    path = Path(path)
    with atomic_file(path) as tmp, open(tmp, "wb") as out:
        np.savez_compressed(out, **arrays)
    return path


def read_omniglot_npz(path: PathLike) -> Dict[str, np.ndarray]:
    """Load and check a packed cache (format in the module docstring)."""
    path = Path(path)

    def bad(problem: str) -> ValueError:
        return DamagedFileError(path, f"not an Omniglot cache: {problem}", _rebuild_cache(path))

    with reading(path, _rebuild_cache(path)), np.load(path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    for set_name in SETS:
        for key in (set_name, *(f"{set_name}_{k}" for k in ("alphabet", "character", "char_id", "alphabet_names"))):
            if key not in arrays:
                raise bad(f"key {key!r} is missing")
        images = arrays[set_name]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != DRAWERS \
                or images.shape[2] != images.shape[3]:
            raise bad(f"{set_name!r} is {images.dtype} {tuple(images.shape)}, expected uint8 [C, {DRAWERS}, S, S]")
        for key in ("alphabet", "character", "char_id"):
            if arrays[f"{set_name}_{key}"].shape != images.shape[:1]:
                raise bad(f"{set_name}_{key} has shape {arrays[f'{set_name}_{key}'].shape}, "
                          f"expected ({images.shape[0]},)")
    return arrays


# --------------------------------------------------------------------------- download

def _fetch(url: str, target: Path, expected_sha256: Optional[str], timeout: float) -> None:
    """Download ``url`` to ``target`` through a temporary file, checking length,
    zip integrity, the expected layout and (if given) the SHA-256."""
    set_name = target.name[len("images_"):-len(".zip")]
    with atomic_file(target) as tmp:
        digest = hashlib.sha256()
        received = 0
        try:
            with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                announced = response.headers.get("Content-Length")
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
                    received += len(chunk)
        except (urllib.error.URLError, OSError) as exc:
            raise RuntimeError(
                f"downloading {url} failed: {exc}. Check base_url and the network, or copy "
                f"{target.name} into {target.parent} by hand.") from exc
        if announced is not None and int(announced) != received:
            raise RuntimeError(f"{url}: received {received} bytes of {announced}; download it again")
        if expected_sha256 is not None and digest.hexdigest() != expected_sha256.lower():
            raise RuntimeError(
                f"{url}: SHA-256 {digest.hexdigest()} differs from the expected {expected_sha256}; "
                f"pass sha256={{'{target.name}': <digest>}} to expect other bytes, or sha256=None")
        if not zipfile.is_zipfile(tmp):
            raise RuntimeError(f"{url} did not return a zip file ({received} bytes)")
        with zipfile.ZipFile(tmp) as archive:
            broken = archive.testzip()
            names = archive.namelist()
        if broken is not None:
            raise RuntimeError(f"{url}: member {broken} of the zip is corrupt; download it again")
        if not any(n.startswith(f"images_{set_name}/") and n.lower().endswith(".png") for n in names):
            raise RuntimeError(f"{url}: the zip holds no images_{set_name}/<Alphabet>/characterNN/*.png")


def download_omniglot(folder: PathLike, *, base_url: str = DEFAULT_BASE_URL,
                      sha256: Optional[Mapping[str, str]] = None, timeout: float = 60.0) -> None:
    """Fetch the official zips that ``folder`` lacks.

    ``<base_url>/images_background.zip`` and ``<base_url>/images_evaluation.zip``
    are each written to a temporary file, checked (length against
    Content-Length, zip CRCs, the ``images_<set>/`` layout, and the SHA-256
    in ``sha256[file name]`` where given) and renamed into place.  No
    checksums are pinned by default: the official bytes are not fixed here.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for set_name in SETS:
        name = f"images_{set_name}.zip"
        target = folder / name
        if not target.is_file():
            _fetch(base_url.rstrip("/") + "/" + name, target, (sha256 or {}).get(name), timeout)


# --------------------------------------------------------------------------- arrays

@dataclass(frozen=True)
class OmniglotArrays:
    """All 1623 characters pooled, sorted by (alphabet, character).

    Attributes:
        images: uint8 [C, 20, S, S], 255 = paper, 0 = ink (as in the files).
        names: C names ``"<Alphabet>/characterNN"``.
        background: bool [C], True for the characters of images_background.
        char_id: int64 [C], the 4-digit id in the file names.
    """

    images: np.ndarray
    names: Tuple[str, ...]
    background: np.ndarray
    char_id: np.ndarray

    @classmethod
    def from_cache(cls, arrays: Mapping[str, np.ndarray]) -> "OmniglotArrays":
        """Pool the two sets of a cache dict (see :func:`read_omniglot_npz`)."""
        keys = [(str(a), str(c)) for s in SETS
                for a, c in zip(arrays[f"{s}_alphabet"], arrays[f"{s}_character"])]
        if len(set(keys)) != len(keys):
            raise ValueError("a character appears twice across images_background and images_evaluation")
        order = np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)
        images = np.concatenate([arrays[s] for s in SETS])
        background = np.concatenate([np.full(len(arrays[s]), s == "background") for s in SETS])
        char_id = np.concatenate([arrays[f"{s}_char_id"] for s in SETS]).astype(np.int64)
        return cls(images=images[order], names=tuple("/".join(keys[i]) for i in order),
                   background=background[order], char_id=char_id[order])


def load_omniglot_arrays(root: Optional[PathLike] = None, *, image_size: int = 28,
                         download: bool = False, base_url: str = DEFAULT_BASE_URL,
                         sha256: Optional[Mapping[str, str]] = None,
                         write_cache: bool = True) -> OmniglotArrays:
    """Find Omniglot under the data root and load it, pooled and sorted.

    Each candidate folder (``<root>/omniglot``, then ``<root>``) is tried for
    the cache ``omniglot{S}.npz``, then the zips or folders of both sets
    (read in about 10 s, then cached beside them if ``write_cache`` and the
    folder is writable).  With nothing found and ``download=True`` the zips
    are fetched into ``<root>/omniglot`` (see :func:`download_omniglot`) and
    the cache is built there.

    Raises:
        DatasetNotFoundError: nothing found and ``download`` is False; the
            message lists each folder searched and how to get the data.
    """
    folders = dataset_dirs(("omniglot",), root)
    looked: List[Tuple[Path, str]] = []
    for folder in folders:
        cache = folder / cache_name(image_size)
        if cache.is_file():
            return OmniglotArrays.from_cache(read_omniglot_npz(cache))
        sources = _find_sources(folder)
        if len(sources) == len(SETS):
            arrays = read_omniglot_files(folder, image_size)
            if write_cache:
                try:
                    write_npz_atomic(cache, arrays)
                except OSError as exc:
                    warnings.warn(f"Omniglot read from {folder} but not cached there ({exc}); "
                                  f"the next load reads the images again", stacklevel=2)
            return OmniglotArrays.from_cache(arrays)
        has = ", ".join(p.name for p in sources.values()) or "nothing of Omniglot"
        looked.append((folder, f"no {cache.name}, no images_{{background,evaluation}}.zip or folders "
                               f"(has {has})" if folder.is_dir() else "no such folder"))
    if not download:
        raise DatasetNotFoundError("Omniglot", looked, _HOW_TO_GET)
    target = folders[0]
    download_omniglot(target, base_url=base_url, sha256=sha256)
    arrays = read_omniglot_files(target, image_size)
    write_npz_atomic(target / cache_name(image_size), arrays)
    return OmniglotArrays.from_cache(arrays)


# --------------------------------------------------------------------------- split

def omniglot_split(names: Sequence[str], background: Optional[np.ndarray] = None, *,
                   split: str = "standard", split_seed: int = 0, train_classes: int = 1200,
                   val_classes: int = 0) -> Dict[str, np.ndarray]:
    """Indices into ``names`` of the train / val / test characters.

    Args:
        names: ``"<Alphabet>/characterNN"`` per character, in any order.
        background: bool per character, True for images_background; needed
            for ``split="lake"``.
        split: ``"standard"`` (``train_classes`` random characters train, the
            rest test) or ``"lake"`` (background trains, evaluation tests).
        split_seed: seed of ``np.random.RandomState`` permuting the sorted names.
        train_classes: size of the standard training split (before ``val_classes``).
        val_classes: characters moved from training into ``"val"``.

    Returns:
        ``{"train", "val", "test"}`` → sorted int64 index arrays, disjoint,
        covering all characters.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; use one of {SPLITS}")
    n = len(names)
    order = np.array(sorted(range(n), key=lambda i: tuple(names[i].split("/"))), dtype=np.int64)
    if split == "standard":
        if not 0 < train_classes < n:
            raise ValueError(f"train_classes={train_classes} must be in 1..{n - 1} for {n} characters "
                             f"(the standard split uses 1200 of 1623)")
        shuffled = order[np.random.RandomState(split_seed).permutation(n)]
        train, test = shuffled[:train_classes], shuffled[train_classes:]
    else:
        if background is None or len(background) != n:
            raise ValueError("split='lake' needs `background`, one bool per character")
        background = np.asarray(background, dtype=bool)
        in_background = order[background[order]]
        train = in_background[np.random.RandomState(split_seed).permutation(len(in_background))]
        test = order[~background[order]]
    if not 0 <= val_classes < len(train):
        raise ValueError(f"val_classes={val_classes} must be in 0..{len(train) - 1}, "
                         f"below the {len(train)} training characters")
    cut = len(train) - val_classes
    subsets = {"train": np.sort(train[:cut]), "val": np.sort(train[cut:]), "test": np.sort(test)}
    together = np.concatenate(list(subsets.values()))
    if len(np.unique(together)) != n or len(together) != n:
        raise RuntimeError("Omniglot subsets overlap or miss characters; this is a bug in omniglot_split")
    return subsets


ROTATIONS = (0, 90, 180, 270)


def valid_rotations(rotations: Sequence[int]) -> bool:
    """Whether ``rotations`` are one or more distinct angles from :data:`ROTATIONS`."""
    return bool(rotations) and len(set(rotations)) == len(rotations) and all(r in ROTATIONS for r in rotations)


def rotate_classes(images: torch.Tensor, rotations: Sequence[int]) -> torch.Tensor:
    """Each class once per rotation: [C, M, ..., H, W] → [C·R, M, ..., H, W].

    Class ``c`` rotated by ``rotations[r]`` degrees counter-clockwise is class
    ``c·R + r``.  Angles must be distinct multiples of 90 in [0, 360).
    """
    if not valid_rotations(rotations):
        raise ValueError(f"rotations={tuple(rotations)}: give distinct angles from {ROTATIONS}")
    if tuple(rotations) == (0,):
        return images
    rotated = [torch.rot90(images, k=r // 90, dims=(-2, -1)) for r in rotations]
    return torch.stack(rotated, dim=1).flatten(0, 1)


class Omniglot:
    """One subset of Omniglot as class-indexed images, ready for the task sampler.

    Attributes:
        images: uint8 tensor [C, 20, 1, S, S], ink = 255, paper = 0 (see the
            module docstring); C = characters × len(rotations).
        class_names: C names ``"<Alphabet>/characterNN/rot<angle>"``.
        characters: indices of this subset's characters in the pooled,
            sorted :class:`OmniglotArrays`.

    Args:
        root: data root or Omniglot folder (see :mod:`imaml_ext.data.paths`).
        subset: ``"train"``, ``"val"`` or ``"test"``.
        split, split_seed, train_classes, val_classes: see :func:`omniglot_split`.
        rotations: angles in degrees; each rotation of a character is a class.
        image_size: side S of the images.
        download, base_url, sha256: see :func:`load_omniglot_arrays`.
    """

    def __init__(self, root: Optional[PathLike] = None, subset: str = "train", *,
                 split: str = "standard", split_seed: int = 0, train_classes: int = 1200,
                 val_classes: int = 0, rotations: Sequence[int] = (0,), image_size: int = 28,
                 download: bool = False, base_url: str = DEFAULT_BASE_URL,
                 sha256: Optional[Mapping[str, str]] = None):
        arrays = load_omniglot_arrays(root, image_size=image_size, download=download,
                                      base_url=base_url, sha256=sha256)
        self._select(arrays, subset, split, split_seed, train_classes, val_classes, rotations)

    @classmethod
    def from_arrays(cls, arrays: OmniglotArrays, subset: str = "train", *, split: str = "standard",
                    split_seed: int = 0, train_classes: int = 1200, val_classes: int = 0,
                    rotations: Sequence[int] = (0,)) -> "Omniglot":
        """A subset of already loaded arrays (to build several subsets from one load)."""
        self = cls.__new__(cls)
        self._select(arrays, subset, split, split_seed, train_classes, val_classes, rotations)
        return self

    def _select(self, arrays: OmniglotArrays, subset: str, split: str, split_seed: int,
                train_classes: int, val_classes: int, rotations: Sequence[int]) -> None:
        check_subset(subset)
        rotations = tuple(int(r) for r in rotations)
        chosen = omniglot_split(arrays.names, arrays.background, split=split, split_seed=split_seed,
                                train_classes=train_classes, val_classes=val_classes)[subset]
        inked = 255 - torch.from_numpy(arrays.images[chosen])
        self.images = rotate_classes(inked.unsqueeze(2), rotations)
        self.class_names = [f"{arrays.names[i]}/rot{r}" for i in chosen for r in rotations]
        self.characters = chosen
        self.subset, self.split, self.rotations = subset, split, rotations

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        return (f"Omniglot(subset={self.subset!r}, split={self.split!r}, classes={len(self)}, "
                f"rotations={self.rotations}, images={tuple(self.images.shape)})")
