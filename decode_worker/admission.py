"""How requests enter the decode engine, and leave it before they run: the handlers of the engine's
messages (decode_worker/messages.py) and the admission of queued requests into reserved pages.

    Submit -> queued for memory -> admit: pages held (cached prefix + new), reservation marked
    -> KvReady: first token committed and sent, ready to batch.    Abort / KvFailed / the deadline
    fail it at any point.
    A request whose short uncached suffix is computed here (scheduler `local` queue) is reserved
    with decode_computes (the prefill worker sends nothing), then `prefill_local` runs its suffix and
    samples (and sends) its first token on this engine.

Engine thread only.
"""

from __future__ import annotations

import logging

from decode_worker.commit import StopRules, commit_first_token
from decode_worker.messages import Abort, KvFailed, KvReady, Submit
from decode_worker.output import Output
from decode_worker.reservations import Reservations
from decode_worker.scheduler import QueueFullError, Scheduler
from decode_worker.stepper import Stepper

log = logging.getLogger(__name__)


class Admission:
    def __init__(self, sched: Scheduler, stepper: Stepper, rules: StopRules, reservations: Reservations,
                 out: Output) -> None:
        self.sched = sched
        self.stepper = stepper
        self.rules = rules
        self.reservations = reservations
        self.out = out

    def admit(self) -> None:
        """Give queued requests their pages (FIFO) and mark their transfers reserved."""
        for req in self.sched.admit():
            if req.needs_recompute:  # a resumed request's KV is rebuilt locally
                continue
            if req.local_prefill:
                continue  # no prefill leg: nobody waits for a reservation
            self.reservations.reserve(req.transfer_id, req.pages, req.cached_len, req.computes_here)

    def prefill_local(self) -> None:
        """Compute the uncached prompt suffix of every request of the `local` queue and commit its
        first token (the device must be idle: no launched step in flight)."""
        while self.sched.local:
            req = self.sched.local[0]
            try:
                self.stepper.prefill_local(req)
            except Exception as e:  # noqa: BLE001 - logged there: fails this request, not the process
                self.out.step_failed([req], e)
                continue
            self.sched.prefilled_here(req)
            self.out.emit(req)  # the first token now, not with the next step (and the finish, if it ended)

    def on_submit(self, msg: Submit) -> None:
        try:
            self.sched.submit(msg.req)
        except (QueueFullError, ValueError) as e:
            msg.admitted.set_exception(e)
            return
        msg.admitted.set_result(None)

    def on_abort(self, msg: Abort) -> None:
        req = self.sched.by_id.get(msg.request_id)
        if req is not None and (msg.only is None or msg.only is req):
            self.out.fail(req, msg.code, msg.message)

    def on_kv_ready(self, msg: KvReady) -> None:
        req = self.sched.waiting_kv.get(msg.transfer_id)
        if req is None:
            log.warning("KV for unknown or aborted transfer %d dropped", msg.transfer_id)
            return
        self.stepper.on_kv_arrival(req, msg.aux)
        commit_first_token(req, msg.aux, self.rules)
        self.sched.kv_arrived(req)
        # the first token goes out now: waiting for the batch's next step would add a whole decode
        # step to the time to first token (tens of ms at full depth under load); with the finish, if
        # the first token already ended it (eos, max_tokens=1)
        self.out.emit(req)

    def on_kv_failed(self, msg: KvFailed) -> None:
        req = self.sched.waiting_kv.get(msg.transfer_id)
        if req is not None:
            self.out.fail(req, "UNAVAILABLE", f"KV transfer failed: {msg.reason}")


__all__ = ["Admission"]
