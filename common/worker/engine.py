"""EngineThread: the thread that owns a worker's scheduler, fed through an inbox.

Both worker roles run one: other threads (gRPC handlers, transport) only `post` messages; the
engine thread drains them between steps, dispatching ("kind", payload) to `self._on_<kind>`, and
runs `run_once` until stopped, under torch.inference_mode (logits are processed in place).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import torch


class EngineThread:
    def __init__(self, name: str) -> None:
        self.inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self.last_progress = time.monotonic()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    # ------------------------------------------------------------------ called from other threads
    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.post("wake", None)
        self.thread.join(timeout)

    def post(self, kind: str, payload: Any) -> None:
        self.inbox.put((kind, payload))

    # ------------------------------------------------------------------ the engine thread
    def run_once(self) -> None:
        raise NotImplementedError  # one turn of the subclass's loop

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                self.run_once()

    def _drain_inbox(self, block: bool) -> None:
        """Handle every queued message; with `block`, first wait up to 50 ms for one (idle engine)."""
        try:
            item = self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            getattr(self, f"_on_{kind}")(payload)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _on_wake(self, _: Any) -> None:
        pass


__all__ = ["EngineThread"]
