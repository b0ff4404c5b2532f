"""Decode-side admission and continuous batching.

Life of a request:  WAITING_MEMORY --pages reserved--> WAITING_KV --KV + aux arrived--> RUNNING
                    --finished/aborted--> DONE (pages released).

Prefix cache (common/kvcache/prefix_index.py, off with --disable-radix-cache): admission first
takes the pages of the longest cached prefix of the prompt (`cached_len` tokens, whole pages; the
prefill worker then sends only the KV after it) and allocates the rest. When a request ends, the
pages wholly inside the KV it wrote -- prompt and output -- are keyed before its references drop,
so a later turn that repeats the conversation finds them. A request whose uncached suffix is at
most `local_prefill_tokens` (or that came with `local_prefill`) computes the suffix here
(`local` queue) instead of receiving it. Pages of a transfer still arriving are never keyed: a
request's KV counts only from kv_len, set when the whole transfer (or the local prefill) is in.
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
from common.kvcache.prefix_index import PrefixCache
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
    local_prefill: bool = False  # no prefill leg: this worker computes what its cache lacks
    page_keys: list[bytes] = field(default_factory=list)  # keys of the leading pages matched or committed
    cached_len: int = 0  # leading tokens whose KV came from this worker's prefix cache at admission
    computes_here: bool = False  # the uncached prompt suffix is computed on this worker
    cache_salt: str = ""  # prefix-cache pages are shared only with requests of the same salt

    @property
    def pending(self) -> int:
        """The last committed token: the next forward's input (not in the KV cache yet)."""
        return self.output_ids[-1]

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    def history(self) -> list[int]:
        """The tokens whose KV the request needs before its next step: the prompt, or for a retracted
        request the prompt and every committed output but the pending one."""
        return self.prompt_ids + self.output_ids[:-1] if self.needs_recompute else self.prompt_ids


class Scheduler:
    def __init__(self, allocator: PageAllocator, page_size: int, max_running: int,
                 max_queued: int, step_slots: int, cache: PrefixCache | None = None,
                 local_prefill_tokens: int = 0) -> None:
        """cache: the prefix cache over `allocator` (None: none); local_prefill_tokens: compute an
        uncached suffix of at most this many tokens here when some prefix is cached (0: never)."""
        self.allocator = allocator
        self.cache = cache if cache is not None else PrefixCache(allocator, page_size, enabled=False)
        self.local_prefill_tokens = local_prefill_tokens
        self.local: deque[DecodeReq] = deque()  # pages held, prompt suffix to compute here
        self.query_tokens = 0  # prompt tokens matched against the cache since start
        self.hit_tokens = 0  # of them, found cached
        self.local_prefills = 0  # requests whose suffix was computed here since start
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
            history = req.history()
            # referenced first, so the allocation cannot evict them
            hit = self.cache.match(history, self.cache.root_for(req.cache_salt))
            pages = self.cache.alloc(self.pages_for(len(history) + self.step_slots) - len(hit.pages))
            if pages is None:
                self.cache.release(hit.pages)
                break
            self.waiting_memory.popleft()
            req.pages, req.page_keys = hit.pages + pages, hit.keys
            req.cached_len = len(hit.pages) * self.page_size
            if req.needs_recompute:
                self.ready.append(req)
            else:
                self.query_tokens += req.prompt_len
                self.hit_tokens += req.cached_len
                req.state = ReqState.WAITING_KV
                suffix = req.prompt_len - req.cached_len
                req.computes_here = req.local_prefill or 0 < req.cached_len and suffix <= self.local_prefill_tokens
                if req.computes_here:
                    self.local_prefills += 1
                    self.local.append(req)
                else:
                    self.waiting_kv[req.transfer_id] = req
            admitted.append(req)
        return admitted

    def prefilled_here(self, req: DecodeReq) -> None:
        """A request of the `local` queue has its prompt KV and first token: ready to batch."""
        if req in self.local:
            self.local.remove(req)
            self.ready.append(req)

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
                pages = self.cache.alloc(need)
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
        return need <= self.cache.num_free

    def _retract(self, req: DecodeReq) -> None:
        assert self._fence is None, "retraction while a launched step may still write the pages"
        self._keep(req)  # its own pages may come back from the cache on re-admission
        self.cache.release(req.pages)
        req.pages, req.page_keys = [], []
        req.draft = None
        req.needs_recompute = True
        req.state = ReqState.WAITING_MEMORY
        self.running.remove(req)
        self.waiting_memory.appendleft(req)

    def _keep(self, req: DecodeReq) -> None:
        """Key the request's pages wholly inside the KV it has written (prompt and outputs), each with
        the token after it as its successor (unknown past the last committed token)."""
        if req.pages and req.kv_len and not req.needs_recompute:
            seq = req.prompt_ids + req.output_ids
            self.cache.commit(req.pages, req.page_keys, seq, min(req.kv_len, len(seq)),
                              self.cache.root_for(req.cache_salt))

    def release(self, req: DecodeReq, keep: bool = True) -> None:
        """Finish or abort: key the pages of the KV it wrote (unless `keep` is False: a failed step may
        have left it wrong), drop its page references (park them while a fence is up) and forget the
        request (idempotent)."""
        if req.state is ReqState.DONE:
            return
        if req.pages:
            if keep:
                self._keep(req)
            if self._fence is not None:
                self._fence.extend(req.pages)
            else:
                self.cache.release(req.pages)
            req.pages, req.page_keys = [], []
        self.waiting_kv.pop(req.transfer_id, None)
        for q in (self.waiting_memory, self.ready, self.local):
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
        self.cache.release(fence)
        fence.clear()

    # ------------------------------------------------------------------ load report
    @property
    def busy(self) -> bool:
        """Requests with KV in hand: the engine must step them."""
        return bool(self.running or self.ready or self.local)

    def load(self) -> WorkerLoadFigures:
        return WorkerLoadFigures(running=len(self.running), queued=len(self.waiting_memory),
                                 waiting_for_kv=len(self.waiting_kv) + len(self.ready) + len(self.local),
                                 free_pages=self.cache.num_free, total_pages=self.allocator.num_total)
