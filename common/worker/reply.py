"""Reply: an event loop's future that another thread settles.

The engine thread never touches asyncio objects itself: settling goes through the loop with
`call_soon_threadsafe`, and a future that is already done (its awaiter timed out or was cancelled)
is left alone.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class Reply(Generic[T]):
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[T]

    @classmethod
    def to(cls, future: asyncio.Future[T]) -> Reply[T]:
        return cls(future.get_loop(), future)

    @classmethod
    def on_running_loop(cls) -> Reply[T]:
        """A new future of the running loop (call from a coroutine)."""
        loop = asyncio.get_running_loop()
        return cls(loop, loop.create_future())

    def set_result(self, value: T) -> None:
        """Thread-safe."""
        self.loop.call_soon_threadsafe(self._set_result, value)

    def set_exception(self, error: BaseException) -> None:
        """Thread-safe."""
        self.loop.call_soon_threadsafe(self._set_exception, error)

    def _set_result(self, value: T) -> None:
        if not self.future.done():
            self.future.set_result(value)

    def _set_exception(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


__all__ = ["Reply"]
