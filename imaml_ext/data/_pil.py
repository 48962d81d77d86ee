"""Pillow, imported on first use: only decoding image files needs it."""
from __future__ import annotations

from types import ModuleType


def pil_image() -> ModuleType:
    """The ``PIL.Image`` module, or an ImportError that says how to install it."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError(
            "reading image files (PNG/JPEG) needs Pillow, part of the 'train' extra: "
            "pip install 'imaml_ext[train]' (or pip install pillow); a packed .npz or .pkl cache "
            "loads without it") from exc
    return Image
