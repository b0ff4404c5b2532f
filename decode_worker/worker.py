"""The decode engine thread: THE hot loop.

    inbox -> deadlines -> admit (reserve pages) -> local prefills -> batch -> grow/retract
    -> step (plain or EAGLE) -> emit

A request whose uncached prompt suffix is short is prefilled here (admission.prefill_local) with
the device idle: the step in flight, if any, is completed first.

With `overlap` (plain decode on CUDA), a step is launched before the previous one's tokens are
committed, so the host's commit/emit/admission work runs while the device computes:

    inbox -> deadlines -> admit -> batch -> launch step N+1 -> wait step N's tokens -> commit -> emit

A batch the device path cannot sample exactly (logit processors, logprobs, KV recompute, a
retraction) takes the synchronous step, after the step in flight has committed (overlap.py has the
invariants). Other threads only post messages (handled in admission.py) and read `snapshot`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from common.serving import metrics
from common.transport.aux import AuxRecord
from common.worker.engine import EngineThread
from common.worker.reply import Reply
from decode_worker.admission import Admission
from decode_worker.commit import StopRules, commit_tokens
from decode_worker.deadlines import expire_deadlines
from decode_worker.messages import Abort, DecodeMsg, Flush, KvFailed, KvReady, Submit
from decode_worker.output import Output, report_load
from decode_worker.overlap import LaunchedStep, wants_token
from decode_worker.reservations import Reservations, Reserved
from decode_worker.scheduler import DecodeReq, ReqState, Scheduler
from decode_worker.stepper import LaunchingStepper, Stepper

log = logging.getLogger(__name__)


class DecodeEngine(EngineThread[DecodeMsg]):
    def __init__(self, sched: Scheduler, stepper: Stepper, rules: StopRules, overlap: bool = False) -> None:
        """overlap: launch each step before committing the previous one (`stepper` must be a
        LaunchingStepper); batches it cannot take still run the synchronous step."""
        super().__init__("decode-engine", sched)
        self.sched, self.stepper, self.rules, self.overlap = sched, stepper, rules, overlap
        self._launcher: LaunchingStepper = stepper  # type: ignore[assignment]  # used only with overlap
        self.in_flight: LaunchedStep | None = None  # launched, tokens not committed yet
        self.reservations = Reservations()  # the app sets its sink (kv_receiver.PageSink) before start
        self.out = Output(sched, self.reservations)
        self.admission = Admission(sched, stepper, rules, self.reservations, self.out)
        self.handle(Submit, self.admission.on_submit)
        self.handle(Abort, self.admission.on_abort)
        self.handle(KvReady, self.admission.on_kv_ready)
        self.handle(KvFailed, self.admission.on_kv_failed)
        self.handle(Flush, lambda msg: msg.reply(self.sched.cache.flush()))
        self._reported: dict[str, int] = {}  # prefix-cache counter totals already added to the metrics

    # ------------------------------------------------------------------ called from other threads
    def submit(self, req: DecodeReq, admitted: asyncio.Future[None]) -> None:
        """`admitted` resolves to None, or to an exception (queue full, bad request)."""
        self.post(Submit(req, Reply.to(admitted)))

    def abort(self, request_id: str, code: str = "CANCELLED", message: str = "aborted",
              only: DecodeReq | None = None) -> None:
        self.post(Abort(request_id, code, message, only))

    def kv_ready(self, transfer_id: int, aux: AuxRecord) -> None:
        self.post(KvReady(transfer_id, aux))

    def kv_failed(self, transfer_id: int, reason: str) -> None:
        self.post(KvFailed(transfer_id, reason))

    async def wait_reserved(self, transfer_id: int, timeout: float) -> Reserved | None:
        return await self.reservations.wait(transfer_id, timeout)

    def flush_cache(self, reply: Callable[[int], None]) -> None:
        """Forget the prefix cache; reply(pages freed) comes from the engine thread."""
        self.post(Flush(reply))

    # ------------------------------------------------------------------ the loop
    def run_once(self) -> None:
        """One turn of the loop (tests drive it directly; it blocks briefly on the inbox when idle)."""
        self._drain_inbox(block=not self.sched.busy and self.in_flight is None)
        expire_deadlines(self.sched.by_id.values(), self.out)
        self.admission.admit()
        if self.sched.local:
            self._finish_in_flight()
            self.admission.prefill_local()
        self.publish()  # the work in hand before the step: a step that never ends shows as a stall
        if not (self.overlap and self._overlap_step()):
            self._finish_in_flight()
            self._sync_step()
        self.last_progress = time.monotonic()
        self.publish()
        report_load(self.snapshot.load)
        self._report_cache()

    def _report_cache(self) -> None:
        sched = self.sched
        metrics.report_decode_prefix_cache(sched.cache, self._reported, query_tokens=sched.query_tokens,
                                           hit_tokens=sched.hit_tokens, local_prefills=sched.local_prefills)

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
        except Exception as e:  # noqa: BLE001 - logged there: a failed step fails its batch, not the process
            self.out.step_failed(batch, e)
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
        except Exception as e:  # noqa: BLE001 - logged there: a failed step fails its batch, not the process
            self.out.step_failed([r for r in step.reqs if r.state is ReqState.RUNNING], e)
            tokens = []
        self.sched.lift_fence(step.fence)
        live = [(req, tok) for req, tok in zip(step.reqs, tokens)
                if req.state is ReqState.RUNNING and req.finish is None]
        for req, tok in live:
            commit_tokens(req, [tok], self.rules)
        self.out.emit_all(req for req, _ in live)

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
            for req in (r for r in batch if r.needs_recompute):
                self.stepper.recompute(req)
                req.needs_recompute = False
            if batch:
                self.stepper.step(batch)
        except Exception as e:  # noqa: BLE001 - logged there: a failed step fails its batch, not the process
            self.out.step_failed(batch, e)
            return
        self.out.emit_all(batch)
