"""Scoped switches: a setting that a ``with`` block changes for the code it runs.

Each :class:`Switch` is a :class:`contextvars.ContextVar`: a value per thread
(and per asyncio task), restored when the block ends, however it ends.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Generic, Iterator, TypeVar

__all__ = ["Switch"]

V = TypeVar("V")


class Switch(Generic[V]):
    """A named setting with a default; ``with switch.set(value):`` changes it inside the block."""

    def __init__(self, name: str, default: V):
        self._default = default
        self._var: contextvars.ContextVar[V] = contextvars.ContextVar(name, default=default)

    def get(self) -> V:
        return self._var.get()

    @contextlib.contextmanager
    def set(self, value: V) -> Iterator[None]:
        token = self._var.set(value)
        try:
            yield
        finally:
            try:
                self._var.reset(token)
            except ValueError:  # the block ends in another context (a generator resumed there)
                self._var.set(self._default if token.old_value is contextvars.Token.MISSING else token.old_value)
