"""What other threads tell the decode engine thread (besides common/worker/messages.py's Wake and Stop).

Posted by the gRPC handlers (Submit, Abort, Flush) and the KV receiver threads (KvReady, KvFailed); each has
one handler on decode_worker.worker.DecodeEngine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from common.transport.aux import AuxRecord
from common.worker.reply import Reply
from decode_worker.scheduler import DecodeReq


@dataclass(frozen=True)
class Submit:
    """A new request; `admitted` gets None once it is queued, or the QueueFullError / ValueError."""

    req: DecodeReq
    admitted: Reply[None]


@dataclass(frozen=True)
class Abort:
    """Fail the request (if still active) with an ErrorEvent of `code` (a grpc.StatusCode name).
    With `only`, just that request object: a request id reused by another call is left alone."""

    request_id: str
    code: str
    message: str
    only: DecodeReq | None = None


@dataclass(frozen=True)
class KvReady:
    """A transfer's KV is in its reserved pages; `aux` carries the first token and draft state."""

    transfer_id: int
    aux: AuxRecord


@dataclass(frozen=True)
class KvFailed:
    transfer_id: int
    reason: str


@dataclass(frozen=True)
class Flush:
    """Forget the prefix cache; `reply` gets the number of pages freed (engine thread)."""

    reply: Callable[[int], None]


DecodeMsg = Submit | Abort | KvReady | KvFailed | Flush

__all__ = ["Abort", "DecodeMsg", "Flush", "KvFailed", "KvReady", "Submit"]
