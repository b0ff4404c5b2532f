"""Chunked-prefill batching under a token budget.

Each engine step takes prompt chunks FIFO until `--chunked-prefill-size` tokens are planned; a long
prompt is split across steps (its later chunks see the earlier ones as cached prefix). Pages for
the whole prompt are taken when a job is first scheduled, so a job never stalls half-way for
memory; a job that does not fit waits (FIFO: later jobs wait behind it).

With the prefix cache on, admission first reuses the cached pages of the prompt's longest cached
prefix (common/kvcache/prefix_index.py): the job starts computing at `cached_len`, and the pages a
forward completed become matchable for later jobs. Keying them (hashing every page in Python, ~1 ms
for an 8K prompt) is deferred to `key_pages`, which the engine calls once the next forward is on the
device, so the GPU does not wait for it between steps; a job's pages are keyed before they are
released, and before a queued job that could share them (same salt and first page) is matched.

Pure Python: unit-testable without a model.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from common.grammar.state import GrammarState
from common.kvcache.allocator import PageAllocator
from common.kvcache.prefix_index import PrefixCache
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
    page_keys: list[bytes] = field(default_factory=list)  # keys of the leading pages matched or committed
    cached_len: int = 0  # prompt tokens whose KV came from the prefix cache (whole pages)
    decode_cached: int = 0  # leading prompt tokens the decode worker holds already: their KV is not sent
    cache_salt: str = ""  # prefix-cache pages are shared only with requests of the same salt
    done_tokens: int = 0  # prompt tokens whose KV is computed (or cached)
    next_seq: int = 0  # next chunk sequence number on the transfer
    first_token: int | None = None
    first_logprob: float = 0.0
    grammar: GrammarState | None = None  # structured output: the first token is sampled under its mask
    grammar_applied: bool = False  # it was (the grammar was in force at output position 0)
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
    def __init__(self, allocator: PageAllocator, page_size: int, chunk_tokens: int, max_queued: int,
                 cache: PrefixCache | None = None) -> None:
        """cache: the prefix cache over `allocator` (None: none, every prompt computed whole)."""
        if chunk_tokens <= 0:
            raise ValueError("--chunked-prefill-size must be positive")
        self.allocator = allocator
        self.cache = cache if cache is not None else PrefixCache(allocator, page_size, enabled=False)
        self.hit_tokens = 0  # prompt tokens admitted from the cache since start
        self.hit_requests = 0
        self.query_tokens = 0  # prompt tokens admitted since start
        self.page_size = page_size
        self.chunk_tokens = chunk_tokens
        self.max_queued = max_queued
        self.queue: deque[PrefillJob] = deque()
        self.active: list[PrefillJob] = []  # holding pages, prefilling
        self.by_id: dict[str, PrefillJob] = {}
        self._unkeyed: list[tuple[PrefillJob, list[int], int]] = []  # (job, seq, upto) of advanced chunks

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
            if self._unkeyed:
                self._key_sharing(job)
            root = self.cache.root_for(job.cache_salt)
            hit = self.cache.match(job.prompt_ids, root)  # referenced first, so allocation cannot evict them
            pages = self.cache.alloc(self.pages_for(job.prompt_len) - len(hit.pages))
            if pages is None:
                self.cache.release(hit.pages)
                break
            self.queue.popleft()
            job.pages, job.page_keys = hit.pages + pages, hit.keys
            job.cached_len = job.done_tokens = len(hit.pages) * self.page_size
            self._count(job)
            job.state = JobState.PREFILLING
            self.active.append(job)
            n = min(budget, job.prompt_len - job.cached_len)
            chunks.append(Chunk(job, job.cached_len, job.cached_len + n))
            budget -= n
        return chunks

    def _count(self, job: PrefillJob) -> None:
        self.query_tokens += job.prompt_len
        if job.cached_len:
            self.hit_tokens += job.cached_len
            self.hit_requests += 1

    def advance(self, chunk: Chunk) -> None:
        """The chunk's forward is done (a final chunk's first token sampled): its whole pages are to
        be keyed (`key_pages`), the last one with the first token as its successor."""
        job = chunk.job
        job.done_tokens = chunk.end
        if self.cache.enabled:
            seq = (job.prompt_ids + [job.first_token] if chunk.is_final and job.first_token is not None
                   else job.prompt_ids)
            self._unkeyed.append((job, seq, chunk.end))
        if chunk.is_final:
            job.state = JobState.SENDING

    def key_pages(self, only: PrefillJob | None = None) -> None:
        """Make the pages of the chunks advanced so far matchable (all, or `only` that job's), in
        the order they were computed."""
        keep = []
        for entry in self._unkeyed:
            job, seq, upto = entry
            if only is not None and job is not only:
                keep.append(entry)
            elif job.pages:
                self.cache.commit(job.pages, job.page_keys, seq, upto, self.cache.root_for(job.cache_salt))
        self._unkeyed = keep

    def _key_sharing(self, job: PrefillJob) -> None:
        """Key the unkeyed pages of jobs whose first page `job` could match (same salt, same tokens)."""
        ps = self.page_size
        if len(job.prompt_ids) <= ps:
            return  # no whole page to match before the last token
        head = job.prompt_ids[:ps]
        for other in {id(j): j for j, _, _ in self._unkeyed if j.cache_salt == job.cache_salt}.values():
            if other.prompt_ids[:ps] == head:
                self.key_pages(other)

    def flush_cache(self) -> int:
        """Forget the prefix cache (pages not yet keyed stay unkeyed); the number of pages freed."""
        self._unkeyed = []
        return self.cache.flush()

    def release(self, job: PrefillJob) -> None:
        """Drop the job's page references (cached pages stay for reuse) and forget it (idempotent)."""
        if job.state is JobState.DONE:
            return
        if self._unkeyed:
            self.key_pages(job)  # keyed pages become CACHED on release, unkeyed ones FREE
        if job.pages:
            self.cache.release(job.pages)
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
                                 free_pages=self.cache.num_free, total_pages=self.allocator.num_total)
