"""Decode-side admission and continuous batching.

Life of a request:  WAITING_MEMORY --pages reserved--> WAITING_KV --KV + aux arrived--> RUNNING
                    --finished/aborted--> DONE (pages freed).
A running request that cannot grow its pages mid-generation is *retracted*: its pages are freed,
its committed tokens kept, and it waits at the head of the memory queue; on re-admission the
engine recomputes its KV locally (the decode worker holds the whole model). Nothing another
request owns is ever touched.

With the overlapped decode loop a step is launched before the previous one's tokens are known, so
a request released meanwhile may still be written by a step on the device: while a *fence* is up,
released pages are parked on it and go back to the allocator only when the engine lifts it (after
that step's completion event).

Pure Python on purpose: unit-testable without a model.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from common.grammar.state import GrammarState
from common.kvcache.allocator import PageAllocator
from common.runtime.draft import DraftState
from common.sampling.logit_processors import ThinkState
from common.serving.sampling_params import SamplingParams
from common.worker.load import WorkerLoadFigures
from decode_worker.output import FinishEvent, OutputChannel


class ReqState(Enum):
    WAITING_MEMORY = "waiting_memory"
    WAITING_KV = "waiting_kv"
    RUNNING = "running"
    DONE = "done"


class QueueFullError(Exception):
    """More requests are waiting for memory than --max-queued-requests allows."""


@dataclass(eq=False)
class DecodeReq:
    request_id: str
    transfer_id: int
    prompt_ids: list[int]
    params: SamplingParams
    channel: OutputChannel
    deadline: float | None = None
    state: ReqState = ReqState.WAITING_MEMORY
    pages: list[int] = field(default_factory=list)
    kv_len: int = 0  # logical slots holding target KV (or being written by a launched step)
    output_ids: list[int] = field(default_factory=list)  # committed; the last one has no KV yet
    logprobs: list = field(default_factory=list)  # per output token (token, logprob, top) when asked
    draft: DraftState | None = None
    needs_recompute: bool = False  # retracted: KV must be rebuilt from prompt + outputs
    verify_steps: int = 0
    accepted_drafts: int = 0
    emitted: int = 0  # output tokens already sent to the channel
    arrival: float = field(default_factory=time.monotonic)
    finish: FinishEvent | None = None
    think_state: ThinkState | None = None  # thinking-budget scan of prompt + committed outputs (a cache)
    grammar: GrammarState | None = None  # structured output: matcher fed with the committed outputs

    @property
    def pending(self) -> int:
        """The last committed token: the next forward's input (not in the KV cache yet)."""
        return self.output_ids[-1]

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


class Scheduler:
    def __init__(self, allocator: PageAllocator, page_size: int, max_running: int,
                 max_queued: int, step_slots: int) -> None:
        self.allocator = allocator
        self.page_size = page_size
        self.max_running = max_running
        self.max_queued = max_queued
        self.step_slots = step_slots  # KV slots one engine step may write beyond kv_len
        self.waiting_memory: deque[DecodeReq] = deque()
        self.waiting_kv: dict[int, DecodeReq] = {}  # by transfer id
        self.ready: deque[DecodeReq] = deque()  # KV complete, not yet in the batch
        self.running: list[DecodeReq] = []
        self.by_id: dict[str, DecodeReq] = {}
        self._fence: list[int] | None = None  # pages released while the newest launched step is in flight

    # ------------------------------------------------------------------ bookkeeping
    def pages_for(self, slots: int) -> int:
        return -(-slots // self.page_size)

    def submit(self, req: DecodeReq) -> None:
        if req.request_id in self.by_id:
            raise ValueError(f"request_id {req.request_id!r} is already active on this worker")
        if len(self.waiting_memory) >= self.max_queued:
            raise QueueFullError(
                f"decode queue is full ({self.max_queued} requests waiting for KV memory); retry later")
        need = self.pages_for(req.prompt_len + self.step_slots)
        if need > self.allocator.num_total:
            raise ValueError(f"prompt of {req.prompt_len} tokens needs {need} KV pages; this worker has "
                             f"{self.allocator.num_total}")
        self.by_id[req.request_id] = req
        self.waiting_memory.append(req)

    def admit(self) -> list[DecodeReq]:
        """Reserve pages, oldest first; stop at the first request that does not fit (FIFO)."""
        admitted = []
        while self.waiting_memory:
            req = self.waiting_memory[0]
            slots = (req.kv_len if req.needs_recompute else req.prompt_len) + self.step_slots
            pages = self.allocator.alloc(self.pages_for(slots))
            if pages is None:
                break
            self.waiting_memory.popleft()
            req.pages = pages
            if req.needs_recompute:
                self.ready.append(req)
            else:
                req.state = ReqState.WAITING_KV
                self.waiting_kv[req.transfer_id] = req
            admitted.append(req)
        return admitted

    def kv_arrived(self, req: DecodeReq) -> None:
        if self.waiting_kv.pop(req.transfer_id, None) is req:
            self.ready.append(req)

    def next_batch(self) -> list[DecodeReq]:
        """Running requests plus newly ready ones, up to --max-running-requests."""
        while self.ready and len(self.running) < self.max_running:
            req = self.ready.popleft()
            req.state = ReqState.RUNNING
            self.running.append(req)
        return list(self.running)

    def grow(self, reqs: Iterable[DecodeReq]) -> list[DecodeReq]:
        """Give every request pages for kv_len + step_slots; retract the youngest on shortage.

        Returns the requests retracted (they left `running`)."""
        retracted: list[DecodeReq] = []
        for req in sorted(reqs, key=lambda r: r.arrival):
            if req.state is not ReqState.RUNNING:
                continue
            need = self.pages_for(req.kv_len + self.step_slots) - len(req.pages)
            while need > 0:
                pages = self.allocator.alloc(need)
                if pages is not None:
                    req.pages.extend(pages)
                    break
                victim = max((r for r in self.running if r.state is ReqState.RUNNING), key=lambda r: r.arrival)
                self._retract(victim)
                retracted.append(victim)
                if victim is req:
                    break
        return retracted

    def can_grow(self, reqs: Iterable[DecodeReq]) -> bool:
        """Whether grow(reqs) finds every page it needs without retracting anyone."""
        need = sum(max(0, self.pages_for(r.kv_len + self.step_slots) - len(r.pages)) for r in reqs)
        return need <= self.allocator.num_free

    def _retract(self, req: DecodeReq) -> None:
        assert self._fence is None, "retraction while a launched step may still write the pages"
        self.allocator.free(req.pages)
        req.pages = []
        req.draft = None
        req.needs_recompute = True
        req.state = ReqState.WAITING_MEMORY
        self.running.remove(req)
        self.waiting_memory.appendleft(req)

    def release(self, req: DecodeReq) -> None:
        """Finish or abort: free pages (park them while a fence is up) and forget the request (idempotent)."""
        if req.state is ReqState.DONE:
            return
        if req.pages:
            if self._fence is not None:
                self._fence.extend(req.pages)
            else:
                self.allocator.free(req.pages)
            req.pages = []
        self.waiting_kv.pop(req.transfer_id, None)
        for q in (self.waiting_memory, self.ready):
            if req in q:
                q.remove(req)
        if req in self.running:
            self.running.remove(req)
        req.state = ReqState.DONE
        self.by_id.pop(req.request_id, None)

    # ------------------------------------------------------------------ fences (overlapped decode)
    def raise_fence(self) -> list[int]:
        """A step was just launched: pages released from now on are parked in the returned list (until
        the next raise_fence) instead of freed. Lift it once that step is done on the device."""
        self._fence = []
        return self._fence

    def lift_fence(self, fence: list[int]) -> None:
        """The step that owned `fence` is done on the device: free its parked pages (and stop parking
        if no newer step was launched since)."""
        if self._fence is fence:
            self._fence = None
        self.allocator.free(fence)
        fence.clear()

    # ------------------------------------------------------------------ load report
    @property
    def busy(self) -> bool:
        """Requests with KV in hand: the engine must step them."""
        return bool(self.running or self.ready)

    def load(self) -> WorkerLoadFigures:
        return WorkerLoadFigures(running=len(self.running), queued=len(self.waiting_memory),
                                 waiting_for_kv=len(self.waiting_kv) + len(self.ready),
                                 free_pages=self.allocator.num_free, total_pages=self.allocator.num_total)
