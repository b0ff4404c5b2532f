"""EngineThread: the thread that owns a worker's scheduler, fed through an inbox.

Both worker roles run one. Other threads (gRPC handlers, transport) only `post` messages, frozen
dataclasses each with one handler (common/worker/dispatch.py); the engine thread drains them between
steps and runs `run_once` until a Stop arrives, under torch.inference_mode (logits are processed in
place). What other threads may know of the scheduler, the engine publishes: `snapshot` is replaced,
never mutated, by `publish` (an attribute store, atomic for readers on any thread).
"""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

from common.worker.dispatch import Handlers
from common.worker.load import EngineSnapshot, LoadSource
from common.worker.messages import Stop, Wake

Msg = TypeVar("Msg")  # the union of a role's messages
T = TypeVar("T")


class EngineThread(ABC, Generic[Msg]):
    def __init__(self, name: str, source: LoadSource) -> None:
        self.inbox: queue.SimpleQueue[Msg | Wake | Stop] = queue.SimpleQueue()
        self._handlers = Handlers(type(self).__name__)
        self._handlers.on(Wake, self._on_wake)
        self._handlers.on(Stop, self._on_stop)
        self._running = True  # engine thread only
        self._source = source
        self.last_progress = time.monotonic()  # engine thread only; others read snapshot.progress
        self.snapshot = EngineSnapshot(source.load(), source.busy, self.last_progress)
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def handle(self, kind: type[T], handler: Callable[[T], None]) -> None:
        """Register the handler of one message type (at construction, before the thread starts)."""
        self._handlers.on(kind, handler)

    # ------------------------------------------------------------------ called from other threads
    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.post(Stop())
        self.thread.join(timeout)

    def post(self, msg: Msg | Wake | Stop) -> None:
        """Queue a message for the engine thread; UnknownMessageError if it has no handler."""
        self._handlers.check(msg)
        self.inbox.put(msg)

    def stalled(self, limit_s: float) -> bool:
        """Whether the engine held work and has not ended a turn for `limit_s` (any thread)."""
        return self.snapshot.stalled(limit_s, time.monotonic())

    # ------------------------------------------------------------------ the engine thread
    @abstractmethod
    def run_once(self) -> None:
        """One turn of the role's loop (drain the inbox, step, publish)."""

    def publish(self) -> None:
        """Replace `snapshot` with the scheduler's figures now."""
        self.snapshot = EngineSnapshot(self._source.load(), self._source.busy, self.last_progress)

    def _loop(self) -> None:
        with torch.inference_mode():
            while self._running:
                self.run_once()

    def _drain_inbox(self, block: bool) -> None:
        """Handle every queued message; with `block`, first wait up to 50 ms for one (idle engine)."""
        try:
            msg = self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handlers.dispatch(msg)
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _on_wake(self, msg: Wake) -> None:
        pass

    def _on_stop(self, msg: Stop) -> None:
        self._running = False


__all__ = ["EngineThread"]
