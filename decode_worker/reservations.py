"""Reservations: which transfers hold their KV pages on this decode worker, and who waits for that.

The prefill side sends no KV byte before the decode side holds the pages: its AwaitReserved call
waits here (`wait`, on the gRPC event loop) until the engine thread admits the request (`reserve`).
`release`, before the pages are freed, withdraws the reservation from the sink too, so chunks that
arrive later are dropped. A wait that sees no reservation within its timeout returns False; a
released reservation does not end waits (they time out, or their caller cancels them).

A reservation carries the decode side's prefix-cache answer (`Reserved`): how many leading prompt
tokens it already holds (the prefill sends only the KV after them), or that it computes the short
uncached suffix itself (the prefill sends nothing; no KV is expected). Such a request may finish
before the prefill worker asks, so the answers of recent decode-computed transfers outlive their
release (bounded).
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from common.worker.reply import Reply


class ReservationSink(Protocol):
    """Where received KV lands (decode_worker.kv_receiver.PageSink)."""

    def expect(self, transfer_id: int, pages: list[int], cached_tokens: int = 0) -> None: ...
    def withdraw(self, transfer_id: int) -> None: ...


@dataclass(frozen=True)
class Reserved:
    """The decode side's answer to AwaitReserved (worker.proto ReserveReply)."""

    cached_tokens: int = 0  # leading prompt tokens whose KV this worker holds (whole pages)
    decode_computes: bool = False  # this worker computes the rest: send nothing


KEEP_COMPUTED = 4096  # answers of released decode-computed transfers kept for late AwaitReserved calls


class Reservations:
    def __init__(self, sink: ReservationSink | None = None) -> None:
        self.sink = sink  # set once, before the engine thread starts
        self._lock = threading.Lock()
        self._reserved: dict[int, Reserved] = {}
        self._computed: OrderedDict[int, Reserved] = OrderedDict()  # released, decode-computed
        self._waiters: dict[int, list[Reply[Reserved]]] = {}

    # ------------------------------------------------------------------ the engine thread
    def reserve(self, transfer_id: int, pages: list[int], cached_tokens: int = 0,
                decode_computes: bool = False) -> None:
        """The transfer's pages are held: tell the sink where its KV goes (none comes when this worker
        computes it), then wake its waiters."""
        answer = Reserved(cached_tokens, decode_computes)
        if self.sink is not None and not decode_computes:
            self.sink.expect(transfer_id, pages, cached_tokens)
        with self._lock:
            self._reserved[transfer_id] = answer
            waiters = self._waiters.pop(transfer_id, [])
        for reply in waiters:
            reply.set_result(answer)

    def release(self, transfer_id: int) -> None:
        """The request finished or failed (idempotent; a transfer never reserved is fine)."""
        if self.sink is not None:
            self.sink.withdraw(transfer_id)
        with self._lock:
            answer = self._reserved.pop(transfer_id, None)
            if answer is not None and answer.decode_computes:
                self._computed[transfer_id] = answer
                while len(self._computed) > KEEP_COMPUTED:
                    self._computed.popitem(last=False)

    # ------------------------------------------------------------------ any event loop
    async def wait(self, transfer_id: int, timeout: float) -> Reserved | None:
        """The answer once the transfer is reserved (at once if it is); None after `timeout` seconds."""
        reply: Reply[Reserved] = Reply.on_running_loop()
        with self._lock:
            answer = self._reserved.get(transfer_id) or self._computed.get(transfer_id)
            if answer is not None:
                return answer
            self._waiters.setdefault(transfer_id, []).append(reply)
        try:
            return await asyncio.wait_for(reply.future, timeout)
        except TimeoutError:
            return None
        finally:
            self._forget(transfer_id, reply)

    def _forget(self, transfer_id: int, reply: Reply[Reserved]) -> None:
        with self._lock:
            waiters = self._waiters.get(transfer_id, [])
            if reply in waiters:
                waiters.remove(reply)
            if not waiters:
                self._waiters.pop(transfer_id, None)


__all__ = ["ReservationSink", "Reservations", "Reserved"]
