"""What other threads tell the prefill engine thread (besides common/worker/messages.py's Wake and Stop).

Posted by the gRPC handlers (Submit, Abort, Flush) and the KV sender threads (TransferDone); each has one
handler on prefill_worker.worker.PrefillEngine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prefill_worker.scheduler import PrefillJob


@dataclass(frozen=True)
class Submit:
    """A new job; a refused one (queue full, too long) gets job.on_done(job, error) at once."""

    job: PrefillJob


@dataclass(frozen=True)
class Abort:
    """Finish the job (if still active) with RuntimeError(reason). With `only`, just that job object:
    a request id reused by another call is left alone."""

    request_id: str
    reason: str
    only: PrefillJob | None = None


@dataclass(frozen=True)
class TransferDone:
    """The decode side confirmed the job's KV (error None), or the transfer failed."""

    job: PrefillJob
    error: Exception | None


@dataclass(frozen=True)
class Flush:
    """Forget the prefix cache; `reply(pages_freed)` is called from the engine thread."""

    reply: Callable[[int], None]


PrefillMsg = Submit | Abort | TransferDone | Flush

__all__ = ["Abort", "Flush", "PrefillMsg", "Submit", "TransferDone"]
