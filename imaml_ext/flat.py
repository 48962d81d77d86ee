"""Flat parameter buffers and their named views.

A model's trainable parameters are handled as one contiguous vector of P
numbers (``[P]`` for the meta-parameters θ, ``[T, P]`` for the adapted
parameters of T tasks).  :class:`ParamLayout` records where each named
parameter lives in that vector, so a buffer can be viewed as the dict that
``torch.func.functional_call`` expects without copying.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Tuple

import torch
from torch import nn

__all__ = ["ParamLayout"]


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and offsets of parameters packed into one flat vector."""

    names: Tuple[str, ...]
    shapes: Tuple[torch.Size, ...]
    offsets: Tuple[int, ...]
    numel: int

    @classmethod
    def from_named(cls, named: Iterable[Tuple[str, torch.Tensor]]) -> "ParamLayout":
        names: List[str] = []
        shapes: List[torch.Size] = []
        offsets: List[int] = []
        total = 0
        for name, tensor in named:
            names.append(name)
            shapes.append(tensor.shape)
            offsets.append(total)
            total += tensor.numel()
        return cls(tuple(names), tuple(shapes), tuple(offsets), total)

    @classmethod
    def from_module(cls, module: nn.Module) -> "ParamLayout":
        """Layout of ``module``'s parameters that require grad, in registration order."""
        return cls.from_named((n, p) for n, p in module.named_parameters() if p.requires_grad)

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate ``tensors`` (each of its layout shape) into one ``[P]`` vector.

        Differentiable: gradients flow back to the individual tensors.
        """
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Named views of ``flat`` (``[..., P]``), each ``[..., *shape]``; no copy
        when ``flat`` is contiguous.

        One ``split`` rather than a ``narrow`` per parameter: its backward is a
        single concatenation, where each narrow's backward would fill a zero
        buffer of the whole ``[..., P]`` size.
        """
        if flat.shape[-1] != self.numel:
            raise ValueError(
                f"flat buffer has {flat.shape[-1]} numbers in its last dimension, "
                f"the parameter layout needs {self.numel}")
        lead = flat.shape[:-1]
        return {
            name: piece.view(*lead, *shape)
            for name, shape, piece in zip(self.names, self.shapes, self.split(flat))
        }

    def split(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """Per-parameter slices of ``flat`` (``[..., P]``), each ``[..., numel_i]``."""
        return list(flat.split([shape.numel() for shape in self.shapes], dim=-1))
