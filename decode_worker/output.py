"""Per-request channels from the engine thread to the gRPC stream coroutines.

The engine thread never touches asyncio objects directly: it calls `OutputChannel.put`, which
hops onto the event loop with `call_soon_threadsafe`. The servicer awaits `get()`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class TokenEvent:
    """Tokens committed in one engine step for one request."""

    token_ids: list[int]
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    completion_tokens: int = 0
    spec_verify_steps: int = 0
    spec_accepted_drafts: int = 0


@dataclass
class FinishEvent:
    reason: str  # "stop" | "length" | "abort"
    matched_token_id: int | None = None


@dataclass
class ErrorEvent:
    """A request-level failure; `code` is a grpc.StatusCode name."""

    code: str
    message: str


Event = TokenEvent | FinishEvent | ErrorEvent


class OutputChannel:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self.closed = False

    def put(self, event: Event) -> None:
        """Thread-safe; callable from the engine or the KV receiver thread."""
        if self._loop.is_closed():
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # loop shut down while the engine was finishing
            pass

    async def get(self) -> Event:
        return await self._queue.get()
