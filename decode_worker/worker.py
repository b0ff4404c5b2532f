"""The decode engine thread: THE hot loop.

    inbox -> admit (reserve pages) -> batch -> grow/retract -> step (plain or EAGLE) -> emit

With `overlap` (plain decode on CUDA), a step is launched before the previous one's tokens are
committed, so the host's commit/emit/admission work runs while the device computes:

    inbox -> admit -> batch -> launch step N+1 -> wait step N's tokens -> commit -> emit

A batch the device path cannot sample exactly (logit processors, logprobs, KV recompute, a
retraction) takes the synchronous step, after the step in flight has committed
(decode_worker/overlap.py has the invariants). Everything else (what a step does, how KV arrives,
how a request is answered) lives in helpers. All scheduler state is owned by this thread; other
threads talk to it through `inbox`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Protocol

from common.serving import metrics
from common.worker.engine import EngineThread
from decode_worker.commit import StopRules, commit_tokens
from decode_worker.output import ErrorEvent, TokenEvent
from decode_worker.overlap import LaunchedStep, wants_token
from decode_worker.scheduler import DecodeReq, QueueFullError, ReqState, Scheduler

log = logging.getLogger(__name__)


class Stepper(Protocol):
    """Advances a batch of running requests by one engine step (plain decode or EAGLE)."""

    def step(self, reqs: list[DecodeReq]) -> None: ...
    def on_kv_arrival(self, req: DecodeReq, aux: Any) -> None: ...
    def recompute(self, req: DecodeReq) -> None: ...


class LaunchingStepper(Stepper, Protocol):
    """A stepper that can also launch a step without waiting for its tokens (overlapped loop)."""

    def can_launch(self, req: DecodeReq, step: int) -> bool: ...
    def launch(self, reqs: list[DecodeReq], prev: LaunchedStep | None) -> LaunchedStep: ...


class DecodeEngine(EngineThread):
    def __init__(self, sched: Scheduler, stepper: Stepper, rules: StopRules, overlap: bool = False) -> None:
        """overlap: launch each step before committing the previous one (`stepper` must be a
        LaunchingStepper); batches it cannot take still run the synchronous step."""
        super().__init__("decode-engine")
        self.sched = sched
        self.sink: Any = None  # decode_worker.kv_receiver.PageSink: told of reservations
        self.stepper = stepper
        self.rules = rules
        self.overlap = overlap
        self._launcher: LaunchingStepper = stepper  # type: ignore[assignment]  # used only with overlap
        self.in_flight: LaunchedStep | None = None  # launched, tokens not committed yet
        self._waiters: dict[int, list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}
        self._reserved: set[int] = set()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ called from other threads
    def submit(self, req: DecodeReq, admitted: asyncio.Future) -> None:
        """`admitted` resolves to None, or to an exception (queue full, bad request)."""
        self.post("submit", (req, asyncio.get_running_loop(), admitted))

    def abort(self, request_id: str, code: str = "CANCELLED", message: str = "aborted") -> None:
        self.post("abort", (request_id, code, message))

    def kv_ready(self, transfer_id: int, aux: Any) -> None:
        self.post("kv_ready", (transfer_id, aux))

    def kv_failed(self, transfer_id: int, reason: str) -> None:
        self.post("kv_failed", (transfer_id, reason))

    async def wait_reserved(self, transfer_id: int, timeout: float) -> bool:
        """Resolves True once the decode request with this transfer id holds its pages."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        with self._lock:
            if transfer_id in self._reserved:
                return True
            self._waiters.setdefault(transfer_id, []).append((loop, fut))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
        finally:
            with self._lock:
                lst = self._waiters.get(transfer_id, [])
                if (loop, fut) in lst:
                    lst.remove((loop, fut))
                if not lst:
                    self._waiters.pop(transfer_id, None)

    def stalled(self, limit_s: float) -> bool:
        busy = bool(self.sched.running or self.sched.ready)
        return busy and time.monotonic() - self.last_progress > limit_s

    # ------------------------------------------------------------------ the loop
    def run_once(self) -> None:
        """One turn of the loop (tests drive it directly; it blocks briefly on the inbox when idle)."""
        idle = not (self.sched.running or self.sched.ready) and self.in_flight is None
        self._drain_inbox(block=idle)
        self._expire_deadlines()
        for req in self.sched.admit():
            if not req.needs_recompute:  # a resumed request's KV is rebuilt locally
                self._mark_reserved(req, True)
        if not (self.overlap and self._overlap_step()):
            self._finish_in_flight()
            self._sync_step()
        self.last_progress = time.monotonic()
        self._report()

    def _overlap_step(self) -> bool:
        """Launch the next step, then commit the one in flight. False, having done nothing, when the
        batch needs the synchronous step (or there is nothing to launch)."""
        prev = self.in_flight
        batch = [r for r in self.sched.next_batch() if wants_token(r, prev)]
        if not batch or not self._can_launch(batch, prev):
            return False
        self.sched.grow(batch)  # cannot retract: _can_launch checked the free pages
        try:
            step: LaunchedStep | None = self._launcher.launch(batch, prev)
        except Exception as e:  # a failed step fails its batch, never the process
            log.exception("decode step failed")
            for req in batch:
                self._fail(req, "INTERNAL", f"decode step failed: {e}")
            step = None
        self.in_flight = step
        if step is not None:
            step.fence = self.sched.raise_fence()
        if prev is not None:
            self._complete(prev)
        return True

    def _can_launch(self, batch: list[DecodeReq], prev: LaunchedStep | None) -> bool:
        for r in batch:
            step = len(r.output_ids) + (prev.in_flight(r) if prev is not None else 0)  # position sampled
            if r.needs_recompute or not self._launcher.can_launch(r, step):
                return False
        return self.sched.can_grow(batch)

    def _finish_in_flight(self) -> None:
        step, self.in_flight = self.in_flight, None
        if step is not None:
            self._complete(step)

    def _complete(self, step: LaunchedStep) -> None:
        """Wait for a launched step's tokens, free the pages parked behind it, commit and emit. A row
        whose request was released after the launch (finished, aborted) is dropped."""
        try:
            tokens = step.wait()
        except Exception as e:
            log.exception("decode step failed")
            tokens = None
            for req in step.reqs:
                if req.state is ReqState.RUNNING:
                    self._fail(req, "INTERNAL", f"decode step failed: {e}")
        self.sched.lift_fence(step.fence)
        if tokens is None:
            return
        live = [(req, tok) for req, tok in zip(step.reqs, tokens)
                if req.state is ReqState.RUNNING and req.finish is None]
        for req, tok in live:
            commit_tokens(req, [tok], self.rules)
        for req, _ in live:
            self._emit(req)

    def _sync_step(self) -> None:
        batch = self.sched.next_batch()
        if not batch:
            return
        for req in self.sched.grow(batch):
            log.warning("KV pool full: retracted %s (%d tokens kept, KV recomputed on resume)",
                        req.request_id, len(req.output_ids))
            metrics.errors_total().labels(code="RETRACTED").inc()
        batch = [r for r in batch if r.state is ReqState.RUNNING]
        try:
            for req in batch:
                if req.needs_recompute:
                    self.stepper.recompute(req)
                    req.needs_recompute = False
            if batch:
                self.stepper.step(batch)
        except Exception as e:  # a failed step fails its batch, never the process
            log.exception("decode step failed")
            for req in batch:
                self._fail(req, "INTERNAL", f"decode step failed: {e}")
            return
        for req in batch:
            self._emit(req)

    def _on_submit(self, payload: tuple[DecodeReq, asyncio.AbstractEventLoop, asyncio.Future]) -> None:
        req, loop, fut = payload
        try:
            self.sched.submit(req)
            result: Any = None
        except (QueueFullError, ValueError) as e:
            result = e
        loop.call_soon_threadsafe(_resolve, fut, result)

    def _on_abort(self, payload: tuple[str, str, str]) -> None:
        request_id, code, message = payload
        req = self.sched.by_id.get(request_id)
        if req is not None:
            self._fail(req, code, message)

    def _on_kv_ready(self, payload: tuple[int, Any]) -> None:
        transfer_id, aux = payload
        req = self.sched.waiting_kv.get(transfer_id)
        if req is None:
            log.warning("KV for unknown or aborted transfer %d dropped", transfer_id)
            return
        req.kv_len = req.prompt_len
        self.stepper.on_kv_arrival(req, aux)
        commit_tokens(req, [aux.first_token], self.rules)
        if req.params.logprobs:
            req.logprobs.append((aux.first_token, aux.first_logprob, []))
        self.sched.kv_arrived(req)
        if req.finish is not None:  # the first token already ended it (eos, max_tokens=1)
            self._emit(req)

    def _on_kv_failed(self, payload: tuple[int, str]) -> None:
        transfer_id, reason = payload
        req = self.sched.waiting_kv.get(transfer_id)
        if req is not None:
            self._fail(req, "UNAVAILABLE", f"KV transfer failed: {reason}")

    # ------------------------------------------------------------------ helpers
    def _mark_reserved(self, req: DecodeReq, ok: bool) -> None:
        if self.sink is not None:
            if ok:
                self.sink.expect(req.transfer_id, req.pages)
            else:
                self.sink.withdraw(req.transfer_id)
        with self._lock:
            if ok:
                self._reserved.add(req.transfer_id)
            else:
                self._reserved.discard(req.transfer_id)
            waiters = self._waiters.pop(req.transfer_id, []) if ok else []
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_resolve, fut, True)

    def _expire_deadlines(self) -> None:
        now = time.time()
        for req in list(self.sched.by_id.values()):
            if req.deadline is not None and now > req.deadline:
                self._fail(req, "DEADLINE_EXCEEDED", "request deadline passed on the decode worker")

    def _fail(self, req: DecodeReq, code: str, message: str) -> None:
        self._mark_reserved(req, False)  # before the pages are freed: late chunks are dropped
        self.sched.release(req)
        req.channel.put(ErrorEvent(code, message))
        metrics.errors_total().labels(code=code).inc()

    def _emit(self, req: DecodeReq) -> None:
        new = req.output_ids[req.emitted:]
        if new:
            lps = req.logprobs[req.emitted:] if req.params.logprobs else []
            req.emitted = len(req.output_ids)
            req.channel.put(TokenEvent(list(new), list(lps), len(req.output_ids),
                                       req.verify_steps, req.accepted_drafts))
        if req.finish is not None:
            req.channel.put(req.finish)
            self._mark_reserved(req, False)
            self.sched.release(req)

    def _report(self) -> None:
        load = self.sched.load()
        metrics.queue_depth().labels(queue="decode_waiting_memory").set(load["queued"])
        metrics.queue_depth().labels(queue="decode_waiting_kv").set(load["waiting_for_kv"])
        metrics.queue_depth().labels(queue="decode_running").set(load["running"])
        metrics.kv_pages().labels(state="free").set(load["free_pages"])
        metrics.kv_pages().labels(state="used").set(load["total_pages"] - load["free_pages"])


def _resolve(fut: asyncio.Future, result: Any) -> None:
    if fut.done():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)

