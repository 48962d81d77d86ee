"""MiniImageNet (Vinyals et al. 2016, split of Ravi & Larochelle 2017).

64 / 16 / 20 classes of 600 RGB images each for train / val / test.  The
dataset folder (``<root>/miniimagenet``, ``<root>/mini-imagenet`` or
``<root>``, see :mod:`imaml_ext.data.paths`) holds either layout, read in
this order:

* ``mini-imagenet-cache-{subset}.pkl``: a pickle of a dict with
  ``"image_data"``, uint8 [N, 84, 84, 3] (RGB, channels last), and
  ``"class_dict"``, {class name: indices into ``image_data``}.  Pickles can
  run code when loaded: only read files you trust.
* ``images/`` with ``{subset}.csv``: the CSV has the header
  ``filename,label``; each ``images/<filename>`` is read with Pillow,
  converted to RGB and, if it is not ``image_size`` square, resized with
  LANCZOS (as Ravi & Larochelle's preprocessing does).

:class:`MiniImageNet` returns ``images`` uint8 [C, M, 3, S, S], grouped by
class: classes sorted by name, each class's images in the order of its
``class_dict`` indices or CSV rows, so both layouts of the same images give
identical arrays.  :func:`~imaml_ext.data.sampler.to_float` (applied by the
task sampler) gives float32 in [0, 1]. Images stay uint8 because the 38,400
training images take 0.8 GB so and 3.3 GB as float32.
"""
from __future__ import annotations

import csv
import pickle
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ._pil import pil_image
from .paths import DatasetNotFoundError, PathLike, check_subset, dataset_dirs, reading

__all__ = ["MiniImageNet", "read_miniimagenet_pickle", "read_miniimagenet_csv"]

_HOW_TO_GET = (
    "MiniImageNet is not downloaded by imaml_ext (ImageNet's terms of access apply). Put "
    "mini-imagenet-cache-{train,val,test}.pkl, or images/ with train.csv, val.csv and test.csv, "
    "into one of these folders.")


def _group(names: Sequence[str], members: Dict[str, List[int]], source: Path) -> np.ndarray:
    """Check every class has the same number of examples; [C, M] indices, classes in ``names`` order."""
    sizes = {name: len(members[name]) for name in names}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{source}: classes have different numbers of images "
                         f"({min(sizes.values())}..{max(sizes.values())}); MiniImageNet has 600 per class")
    return np.array([members[name] for name in names], dtype=np.int64)


def read_miniimagenet_pickle(path: PathLike) -> Tuple[List[str], torch.Tensor]:
    """Read ``mini-imagenet-cache-<subset>.pkl``.

    Returns:
        Class names (sorted) and uint8 images [C, M, 3, H, W].
    """
    path = Path(path)
    with reading(path, f"Delete it and copy {path.name} into {path.parent} again."), open(path, "rb") as f:
        content = pickle.load(f)
    if not isinstance(content, dict) or not {"image_data", "class_dict"} <= set(content):
        raise ValueError(f"{path}: expected a dict with 'image_data' and 'class_dict'")
    data = np.asarray(content["image_data"])
    if data.dtype != np.uint8 or data.ndim != 4 or data.shape[-1] != 3:
        raise ValueError(f"{path}: image_data is {data.dtype} {data.shape}, expected uint8 [N, H, W, 3]")
    members = {str(k): [int(i) for i in v] for k, v in content["class_dict"].items()}
    names = sorted(members)
    index = _group(names, members, path)
    images = torch.empty((*index.shape, 3, *data.shape[1:3]), dtype=torch.uint8)
    for c in range(len(names)):
        images[c] = torch.from_numpy(data[index[c]]).permute(0, 3, 1, 2)
    return names, images


def read_miniimagenet_csv(csv_path: PathLike, images_dir: PathLike,
                          image_size: int = 84) -> Tuple[List[str], torch.Tensor]:
    """Read the images listed in ``csv_path`` (``filename,label``) from ``images_dir``.

    Returns:
        Class names (sorted) and uint8 images [C, M, 3, S, S], S = ``image_size``.
    """
    csv_path, images_dir = Path(csv_path), Path(images_dir)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"filename", "label"} <= set(rows[0]):
        raise ValueError(f"{csv_path}: expected a header 'filename,label' and at least one row")
    members: Dict[str, List[int]] = {}
    for i, row in enumerate(rows):
        members.setdefault(row["label"], []).append(i)
    names = sorted(members)
    index = _group(names, members, csv_path)
    Image = pil_image()
    images = torch.empty((*index.shape, 3, image_size, image_size), dtype=torch.uint8)
    for c, m in np.ndindex(*index.shape):
        file = images_dir / rows[index[c, m]]["filename"]
        if not file.is_file():
            raise FileNotFoundError(f"{csv_path} lists {file.name}, which is not in {images_dir}")
        with reading(file, f"Copy {file.name} into {images_dir} again."), Image.open(file) as image:
            image = image.convert("RGB")
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
            images[c, m] = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    return names, images


class MiniImageNet:
    """One subset of MiniImageNet as class-indexed images, ready for the task sampler.

    Attributes:
        images: uint8 tensor [C, M, 3, S, S] (M = 600 in the real dataset).
        class_names: the C class names (WordNet ids), sorted.

    Args:
        root: data root or MiniImageNet folder (see :mod:`imaml_ext.data.paths`).
        subset: ``"train"``, ``"val"`` or ``"test"``.
        image_size: side S; the pickles hold 84 × 84 images.
    """

    def __init__(self, root: Optional[PathLike] = None, subset: str = "train", *, image_size: int = 84):
        check_subset(subset)
        looked = []
        for folder in dataset_dirs(("miniimagenet", "mini-imagenet"), root):
            pickled = folder / f"mini-imagenet-cache-{subset}.pkl"
            listed, images_dir = folder / f"{subset}.csv", folder / "images"
            if pickled.is_file():
                self.class_names, self.images = read_miniimagenet_pickle(pickled)
                if self.images.shape[-1] != image_size:
                    raise ValueError(f"{pickled} holds {self.images.shape[-1]}×{self.images.shape[-1]} "
                                     f"images, not image_size={image_size}; image_size only resizes "
                                     f"the images/ layout")
                break
            if listed.is_file() and images_dir.is_dir():
                self.class_names, self.images = read_miniimagenet_csv(listed, images_dir, image_size)
                break
            looked.append((folder, f"no {pickled.name}, no {listed.name} with images/"
                           if folder.is_dir() else "no such folder"))
        else:
            raise DatasetNotFoundError(f"MiniImageNet ({subset})", looked, _HOW_TO_GET)
        self.subset = subset

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        return f"MiniImageNet(subset={self.subset!r}, classes={len(self)}, images={tuple(self.images.shape)})"
