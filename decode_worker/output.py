"""How a decode request is answered: its events, the channel that carries them from the engine
thread to the gRPC stream coroutine, and the engine's side of answering (Output).

The engine thread never touches asyncio objects directly: it calls `OutputChannel.put`, which
hops onto the event loop with `call_soon_threadsafe`. The servicer awaits `get()`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common.runtime.step_plan import TPBroken
from common.serving import metrics
from common.worker.load import WorkerLoadFigures

if TYPE_CHECKING:
    from decode_worker.reservations import Reservations
    from decode_worker.scheduler import DecodeReq, Scheduler

log = logging.getLogger(__name__)


@dataclass
class TokenEvent:
    """Tokens committed in one engine step for one request."""

    token_ids: list[int]
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    completion_tokens: int = 0
    spec_verify_steps: int = 0
    spec_accepted_drafts: int = 0
    grammar_tokens: int = 0  # cumulative output tokens sampled under the grammar mask


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


class Output:
    """The engine thread's answers: new tokens, the finish, a failure. A request that ends (finished
    or failed) has its KV reservation withdrawn before its pages are freed, so late chunks are dropped."""

    def __init__(self, sched: Scheduler, reservations: Reservations) -> None:
        self.sched = sched
        self.reservations = reservations

    def emit(self, req: DecodeReq) -> None:
        """Send the tokens committed since the last emit (one TokenEvent with the running counters),
        then the finish, if any, releasing the request."""
        if req.grammar is not None and req.grammar.violation is not None:
            self.fail(req, "INTERNAL", f"structured output broken: {req.grammar.violation}")
            return
        new = req.output_ids[req.emitted:]
        if new:
            lps = req.logprobs[req.emitted:] if req.params.logprobs else []
            req.emitted = len(req.output_ids)
            req.channel.put(TokenEvent(list(new), list(lps), len(req.output_ids), req.verify_steps,
                                       req.accepted_drafts, req.grammar.tokens if req.grammar is not None else 0))
        if req.finish is not None:
            req.channel.put(req.finish)
            self._release(req)

    def emit_all(self, reqs: Iterable[DecodeReq]) -> None:
        for req in reqs:
            self.emit(req)

    def fail(self, req: DecodeReq, code: str, message: str, keep_kv: bool = True) -> None:
        """End the request with an ErrorEvent; `code` is a grpc.StatusCode name. keep_kv: the KV it
        wrote is sound (a cancellation, a deadline) and may stay in the prefix cache."""
        self._release(req, keep_kv)
        req.channel.put(ErrorEvent(code, message))
        metrics.errors_total().labels(code=code).inc()

    def step_failed(self, reqs: Iterable[DecodeReq], error: Exception) -> None:
        """A step raised (call from its except block): fail its batch, never the process (a broken
        tensor-parallel group ends the process soon after: UNAVAILABLE, retry elsewhere)."""
        log.exception("decode step failed")
        code = "UNAVAILABLE" if isinstance(error, TPBroken) else "INTERNAL"
        for req in reqs:
            self.fail(req, code, f"decode step failed: {error}", keep_kv=False)

    def _release(self, req: DecodeReq, keep_kv: bool = True) -> None:
        self.reservations.release(req.transfer_id)
        self.sched.release(req, keep_kv)


def report_load(load: WorkerLoadFigures) -> None:
    """The decode queue and page gauges."""
    metrics.queue_depth().labels(queue="decode_waiting_memory").set(load.queued)
    metrics.queue_depth().labels(queue="decode_waiting_kv").set(load.waiting_for_kv)
    metrics.queue_depth().labels(queue="decode_running").set(load.running)
    metrics.kv_pages().labels(state="free").set(load.free_pages)
    metrics.kv_pages().labels(state="used").set(load.used_pages)
