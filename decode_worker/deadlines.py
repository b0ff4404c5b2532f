"""Request deadlines on the decode worker: a request still active after its deadline_unix fails with
DEADLINE_EXCEEDED (whatever state it is in), checked once per engine turn."""

from __future__ import annotations

import time
from collections.abc import Iterable

from decode_worker.output import Output
from decode_worker.scheduler import DecodeReq

MESSAGE = "request deadline passed on the decode worker"


def overdue(reqs: Iterable[DecodeReq], now: float) -> list[DecodeReq]:
    """The requests whose deadline (unix seconds) is before `now`."""
    return [r for r in reqs if r.deadline is not None and now > r.deadline]


def expire_deadlines(reqs: Iterable[DecodeReq], out: Output) -> None:
    for req in overdue(reqs, time.time()):
        out.fail(req, "DEADLINE_EXCEEDED", MESSAGE)


__all__ = ["expire_deadlines", "overdue"]
