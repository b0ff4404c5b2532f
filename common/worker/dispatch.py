"""Handlers: how an engine thread finds the handler of a message.

One handler per message class, registered once when the engine is built and looked up by the
message's exact type (messages are final dataclasses). A message nobody registered is refused with
UnknownMessageError naming the engine, the type and what the engine does handle: when it is posted
(the sender's thread sees the error), and again should one reach the inbox some other way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

M = TypeVar("M")


class UnknownMessageError(TypeError):
    """A message of a type the engine has no handler for."""


class Handlers:
    def __init__(self, owner: str) -> None:
        self.owner = owner  # named in errors
        self._by_type: dict[type, Callable[..., None]] = {}

    def on(self, kind: type[M], handler: Callable[[M], None]) -> None:
        if kind in self._by_type:
            raise ValueError(f"{self.owner}: {kind.__name__} already has a handler")
        self._by_type[kind] = handler

    def check(self, msg: object) -> None:
        """Raise UnknownMessageError unless `msg` has a handler."""
        if type(msg) not in self._by_type:
            raise self._unknown(msg)

    def dispatch(self, msg: object) -> None:
        handler = self._by_type.get(type(msg))
        if handler is None:
            raise self._unknown(msg)
        handler(msg)

    def _unknown(self, msg: object) -> UnknownMessageError:
        known = ", ".join(sorted(k.__name__ for k in self._by_type))
        return UnknownMessageError(f"{self.owner} has no handler for a {type(msg).__module__}."
                                   f"{type(msg).__qualname__} message (it handles {known})")


__all__ = ["Handlers", "UnknownMessageError"]
