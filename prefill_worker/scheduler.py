"""Chunked-prefill batching under a token budget.

Each engine step takes prompt chunks FIFO until `--chunked-prefill-size` tokens are planned; a long
prompt is split across steps (its later chunks see the earlier ones as cached prefix). Pages for
the whole prompt are taken when a job is first scheduled, so a job never stalls half-way for
memory; a job that does not fit waits (FIFO: later jobs wait behind it).

Pure Python: unit-testable without a model.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from common.kvcache.allocator import PageAllocator
from common.serving.sampling_params import SamplingParams
from common.worker.load import WorkerLoadFigures


class JobState(Enum):
    QUEUED = "queued"
    PREFILLING = "prefilling"
    SENDING = "sending"  # compute done, waiting for the decode side to confirm the transfer
    DONE = "done"


@dataclass(eq=False)
class PrefillJob:
    request_id: str
    transfer_id: int
    prompt_ids: list[int]
    params: SamplingParams
    sender: Any  # KV sender of the decode worker this job streams to
    on_done: Any  # callable(job, error: Exception | None), called once, from the engine thread
    deadline: float | None = None
    state: JobState = JobState.QUEUED
    pages: list[int] = field(default_factory=list)
    done_tokens: int = 0  # prompt tokens whose KV is computed
    next_seq: int = 0  # next chunk sequence number on the transfer
    first_token: int | None = None
    first_logprob: float = 0.0
    kv_bytes: int = 0
    compute_seconds: float = 0.0
    transfer_seconds: float = 0.0
    arrival: float = field(default_factory=time.monotonic)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


@dataclass(frozen=True)
class Chunk:
    job: PrefillJob
    start: int  # first prompt position in this forward
    end: int  # one past the last

    @property
    def is_final(self) -> bool:
        return self.end == self.job.prompt_len


class PrefillScheduler:
    def __init__(self, allocator: PageAllocator, page_size: int, chunk_tokens: int, max_queued: int) -> None:
        if chunk_tokens <= 0:
            raise ValueError("--chunked-prefill-size must be positive")
        self.allocator = allocator
        self.page_size = page_size
        self.chunk_tokens = chunk_tokens
        self.max_queued = max_queued
        self.queue: deque[PrefillJob] = deque()
        self.active: list[PrefillJob] = []  # holding pages, prefilling
        self.by_id: dict[str, PrefillJob] = {}

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def submit(self, job: PrefillJob) -> None:
        if job.request_id in self.by_id:
            raise ValueError(f"request_id {job.request_id!r} is already active on this worker")
        if len(self.queue) >= self.max_queued:
            raise OverflowError(f"prefill queue is full ({self.max_queued} requests waiting)")
        if self.pages_for(job.prompt_len) > self.allocator.num_total:
            raise ValueError(f"prompt of {job.prompt_len} tokens needs more KV pages than this worker has "
                             f"({self.allocator.num_total})")
        self.by_id[job.request_id] = job
        self.queue.append(job)

    def plan(self) -> list[Chunk]:
        """The chunks of the next forward (empty when idle or blocked on memory)."""
        budget = self.chunk_tokens
        chunks: list[Chunk] = []
        for job in self.active:
            if job.state is JobState.PREFILLING and budget > 0:
                n = min(budget, job.prompt_len - job.done_tokens)
                chunks.append(Chunk(job, job.done_tokens, job.done_tokens + n))
                budget -= n
        while budget > 0 and self.queue:
            job = self.queue[0]
            pages = self.allocator.alloc(self.pages_for(job.prompt_len))
            if pages is None:
                break
            self.queue.popleft()
            job.pages = pages
            job.state = JobState.PREFILLING
            self.active.append(job)
            n = min(budget, job.prompt_len)
            chunks.append(Chunk(job, 0, n))
            budget -= n
        return chunks

    def advance(self, chunk: Chunk) -> None:
        chunk.job.done_tokens = chunk.end
        if chunk.is_final:
            chunk.job.state = JobState.SENDING

    def release(self, job: PrefillJob) -> None:
        """Free the job's pages and forget it (idempotent)."""
        if job.state is JobState.DONE:
            return
        if job.pages:
            self.allocator.free(job.pages)
            job.pages = []
        if job in self.queue:
            self.queue.remove(job)
        if job in self.active:
            self.active.remove(job)
        job.state = JobState.DONE
        self.by_id.pop(job.request_id, None)

    @property
    def busy(self) -> bool:
        """Jobs holding pages (computing, or waiting for the decode side to confirm their KV)."""
        return bool(self.active)

    def load(self) -> WorkerLoadFigures:
        return WorkerLoadFigures(running=sum(1 for j in self.active if j.state is JobState.PREFILLING),
                                 queued=len(self.queue),
                                 waiting_for_kv=sum(1 for j in self.active if j.state is JobState.SENDING),
                                 free_pages=self.allocator.num_free, total_pages=self.allocator.num_total)
