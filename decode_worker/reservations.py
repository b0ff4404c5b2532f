"""Reservations: which transfers hold their KV pages on this decode worker, and who waits for that.

The prefill side sends no KV byte before the decode side holds the pages: its AwaitReserved call
waits here (`wait`, on the gRPC event loop) until the engine thread admits the request (`reserve`).
`release`, before the pages are freed, withdraws the reservation from the sink too, so chunks that
arrive later are dropped. A wait that sees no reservation within its timeout returns False; a
released reservation does not end waits (they time out, or their caller cancels them).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Protocol

from common.worker.reply import Reply


class ReservationSink(Protocol):
    """Where received KV lands (decode_worker.kv_receiver.PageSink)."""

    def expect(self, transfer_id: int, pages: list[int]) -> None: ...
    def withdraw(self, transfer_id: int) -> None: ...


class Reservations:
    def __init__(self, sink: ReservationSink | None = None) -> None:
        self.sink = sink  # set once, before the engine thread starts
        self._lock = threading.Lock()
        self._reserved: set[int] = set()
        self._waiters: dict[int, list[Reply[bool]]] = {}

    # ------------------------------------------------------------------ the engine thread
    def reserve(self, transfer_id: int, pages: list[int]) -> None:
        """The transfer's pages are held: tell the sink where its KV goes, then wake its waiters."""
        if self.sink is not None:
            self.sink.expect(transfer_id, pages)
        with self._lock:
            self._reserved.add(transfer_id)
            waiters = self._waiters.pop(transfer_id, [])
        for reply in waiters:
            reply.set_result(True)

    def release(self, transfer_id: int) -> None:
        """The request finished or failed (idempotent; a transfer never reserved is fine)."""
        if self.sink is not None:
            self.sink.withdraw(transfer_id)
        with self._lock:
            self._reserved.discard(transfer_id)

    # ------------------------------------------------------------------ any event loop
    async def wait(self, transfer_id: int, timeout: float) -> bool:
        """True once the transfer is reserved (at once if it is); False after `timeout` seconds."""
        reply: Reply[bool] = Reply.on_running_loop()
        with self._lock:
            if transfer_id in self._reserved:
                return True
            self._waiters.setdefault(transfer_id, []).append(reply)
        try:
            return await asyncio.wait_for(reply.future, timeout)
        except TimeoutError:
            return False
        finally:
            self._forget(transfer_id, reply)

    def _forget(self, transfer_id: int, reply: Reply[bool]) -> None:
        with self._lock:
            waiters = self._waiters.get(transfer_id, [])
            if reply in waiters:
                waiters.remove(reply)
            if not waiters:
                self._waiters.pop(transfer_id, None)


__all__ = ["ReservationSink", "Reservations"]
