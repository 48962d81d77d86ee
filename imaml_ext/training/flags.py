"""Configuration fields declared once: their type rule, help text and command-line flag.

A dataclass field made with :func:`option` carries a :class:`Kind` (the
rule its values follow), a help text and an argument group.  The same
declaration gives

* the dataclass's check (:func:`check_fields`: a ValueError naming the field),
* its command-line flag (:func:`add_flags`: ``--inner-steps`` for
  ``inner_steps``, parsed and checked by the kind, argparse's messages and
  exit code 2 on a bad value).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from ..data.omniglot import ROTATIONS, valid_rotations
from ..validation import is_integer, real_number

__all__ = ["Kind", "Number", "Choice", "Rotations", "POSITIVE_INT", "NONNEGATIVE_INT",
           "POSITIVE_FLOAT", "option", "check_fields", "add_flags", "flag_name"]


class Kind:
    """The values a field takes: :meth:`check` a Python value, :meth:`parse` a command-line text.

    A kind converts the text with :meth:`convert` and describes its values as
    ``what`` in the parse errors ("expected a positive integer, got 'five'").
    """

    def valid(self, value: Any) -> bool:
        raise NotImplementedError

    def problem(self, name: str, value: Any) -> str:
        """Why ``value`` is not valid for field ``name`` (for the ValueError)."""
        raise NotImplementedError

    def check(self, name: str, value: Any) -> None:
        if not self.valid(value):
            raise ValueError(self.problem(name, value))

    def convert(self, text: str) -> Any:
        raise NotImplementedError

    def parse(self, text: str) -> Any:
        try:
            value = self.convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.what}, got {text!r}") from None
        if not self.valid(value):
            raise argparse.ArgumentTypeError(f"must be {self.what}, got {text}")
        return value

    def argparse_kwargs(self) -> Dict[str, Any]:
        return {"type": self.parse}


@dataclass(frozen=True)
class Number(Kind):
    """An integer ≥ ``minimum`` (``cast=int``) or a finite float > ``minimum`` (``cast=float``)."""

    cast: Callable[[str], Any]
    minimum: int
    what: str

    def convert(self, text: str) -> Any:
        return self.cast(text)

    def valid(self, value: Any) -> bool:
        if self.cast is int:
            return is_integer(value) and int(value) >= self.minimum
        try:
            number = real_number("value", value)
        except ValueError:
            return False
        return math.isfinite(number) and number > self.minimum

    def problem(self, name: str, value: Any) -> str:
        if self.cast is int:
            return f"{name} must be an integer ≥ {self.minimum}, got {value!r}"
        return f"{name} must be a positive finite number, got {value!r}"


@dataclass(frozen=True)
class Choice(Kind):
    """One of ``choices`` (argparse says "invalid choice" for others)."""

    choices: Tuple[str, ...]

    def valid(self, value: Any) -> bool:
        return value in self.choices

    def problem(self, name: str, value: Any) -> str:
        return f"{name} must be one of {self.choices}, got {value!r}"

    def argparse_kwargs(self) -> Dict[str, Any]:
        return {"choices": self.choices}


@dataclass(frozen=True)
class Rotations(Kind):
    """Distinct angles from (0, 90, 180, 270); on the command line ``0,90,180,270``."""

    def valid(self, value: Any) -> bool:
        return valid_rotations(tuple(value))

    def problem(self, name: str, value: Any) -> str:
        return f"{name} must be distinct angles from {ROTATIONS}, got {value}"

    def parse(self, text: str) -> Tuple[int, ...]:
        try:
            angles = tuple(int(a) for a in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated degrees like 0,90,180,270, got {text!r}") from None
        if not self.valid(angles):
            raise argparse.ArgumentTypeError(f"angles must be distinct values of 0, 90, 180, 270, got {text!r}")
        return angles


POSITIVE_INT = Number(int, 1, "a positive integer")
NONNEGATIVE_INT = Number(int, 0, "a non-negative integer")
POSITIVE_FLOAT = Number(float, 0, "a positive number")


def option(default: Any, kind: Kind, help: Optional[str] = None, group: Optional[str] = None) -> Any:
    """A dataclass field with ``kind``; with ``group`` it is also a command-line flag in that
    argument group (``help`` its help text)."""
    metadata = {"kind": kind, "help": help, "group": group}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_fields(obj: Any) -> None:
    """Check the fields of dataclass ``obj`` that have a kind, in declaration order;
    raise ValueError naming the first invalid one."""
    for f in dataclasses.fields(obj):
        kind = f.metadata.get("kind")
        if kind is not None:
            kind.check(f.name, getattr(obj, f.name))


def flag_name(name: str) -> str:
    """``inner_steps`` -> ``--inner-steps``."""
    return "--" + name.replace("_", "-")


def add_flags(groups: Mapping[str, Any], cls: type, with_defaults: bool = False) -> None:
    """Add one flag per field of ``cls`` whose group is in ``groups`` (a parser or argument group
    each), group by group, in declaration order within a group; the destination is the field
    name.  Without ``with_defaults`` a flag not given is None (the value then comes from elsewhere)."""
    fields = dataclasses.fields(cls)
    for group, target in groups.items():
        for f in (f for f in fields if f.metadata.get("group") == group):
            extra = {"default": f.default} if with_defaults else {}
            target.add_argument(flag_name(f.name), dest=f.name, help=f.metadata.get("help"),
                                **f.metadata["kind"].argparse_kwargs(), **extra)
