"""What an engine thread tells the rest of the process about its load.

The scheduler counts (WorkerLoadFigures) are the GetLoad reply and the queue/page gauges. Only the
engine thread may read its scheduler, so after each inbox drain and each step it publishes an
EngineSnapshot by replacing one attribute; the event loop (GetLoad, the stall watch, drain) reads
that attribute and never the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class WorkerLoadFigures:
    """One worker's request and page counts (the same fields for both roles)."""

    running: int  # decode: in the batch; prefill: computing
    queued: int  # waiting for KV pages
    waiting_for_kv: int  # decode: pages held, KV not arrived or not batched; prefill: KV sent, unconfirmed
    free_pages: int
    total_pages: int

    @property
    def used_pages(self) -> int:
        return self.total_pages - self.free_pages


@dataclass(frozen=True)
class EngineSnapshot:
    load: WorkerLoadFigures
    busy: bool  # the engine holds work it must step: a turn that does not end is a stall
    progress: float  # time.monotonic() when the engine last ended a turn

    def stalled(self, limit_s: float, now: float) -> bool:
        return self.busy and now - self.progress > limit_s


class LoadSource(Protocol):
    """A scheduler, as its engine thread sees it when publishing."""

    @property
    def busy(self) -> bool: ...

    def load(self) -> WorkerLoadFigures: ...


__all__ = ["EngineSnapshot", "LoadSource", "WorkerLoadFigures"]
