"""PrefillScheduler on its own (pure Python): the token budget of a step, chunking, FIFO admission
under memory, page release, queue limits and the load figures."""

from __future__ import annotations

import pytest

from common.kvcache.allocator import PageAllocator
from common.kvcache.prefix_index import PrefixCache
from common.serving.sampling_params import SamplingParams
from common.worker.load import WorkerLoadFigures
from prefill_worker.scheduler import Chunk, JobState, PrefillJob, PrefillScheduler

PAGE = 4


def job(rid: str, n: int) -> PrefillJob:
    return PrefillJob(rid, transfer_id=sum(map(ord, rid)), prompt_ids=list(range(n)),
                      params=SamplingParams(max_tokens=1), sender=None, on_done=None)


def spans(chunks: list[Chunk]) -> list[tuple[str, int, int, bool]]:
    return [(c.job.request_id, c.start, c.end, c.is_final) for c in chunks]


def step(sched: PrefillScheduler) -> list[tuple[str, int, int, bool]]:
    """Plan one forward and mark its chunks computed (what the engine does around its forward)."""
    chunks = sched.plan()
    for c in chunks:
        sched.advance(c)
    return spans(chunks)


def drain(sched: PrefillScheduler) -> list[list[tuple[str, int, int, bool]]]:
    steps = []
    while planned := step(sched):
        steps.append(planned)
    return steps


def test_a_long_prompt_is_chunked_under_the_token_budget() -> None:
    alloc = PageAllocator(65)
    sched = PrefillScheduler(alloc, PAGE, chunk_tokens=8, max_queued=4)
    a = job("a", 21)
    sched.submit(a)
    assert a.state is JobState.QUEUED and a.pages == [] and alloc.num_free == 64

    assert step(sched) == [("a", 0, 8, False)]
    # the whole prompt's pages are taken when the job is first scheduled
    assert a.state is JobState.PREFILLING and len(a.pages) == 6 and alloc.num_free == 58
    assert a.done_tokens == 8
    assert drain(sched) == [[("a", 8, 16, False)], [("a", 16, 21, True)]]
    assert a.state is JobState.SENDING and a.done_tokens == 21
    assert sched.plan() == []  # a job waiting for its transfer takes no budget

    sched.release(a)
    assert a.state is JobState.DONE and a.pages == [] and alloc.num_free == 64 and not sched.by_id


def test_a_prompt_of_exactly_the_budget_is_one_final_chunk() -> None:
    sched = PrefillScheduler(PageAllocator(65), PAGE, chunk_tokens=8, max_queued=4)
    sched.submit(job("a", 8))
    sched.submit(job("b", 1))
    assert drain(sched) == [[("a", 0, 8, True)], [("b", 0, 1, True)]]


def test_requests_share_a_step_in_arrival_order() -> None:
    alloc = PageAllocator(65)
    sched = PrefillScheduler(alloc, PAGE, chunk_tokens=8, max_queued=4)
    for rid, n in (("a", 5), ("b", 6), ("c", 9)):
        sched.submit(job(rid, n))
    assert step(sched) == [("a", 0, 5, True), ("b", 0, 3, False)]
    assert sched.by_id["c"].pages == [] and alloc.num_free == 64 - 2 - 2  # c not scheduled yet
    # the job already prefilling goes first, then the queue
    assert drain(sched) == [[("b", 3, 6, True), ("c", 0, 5, False)], [("c", 5, 9, True)]]


def test_a_new_request_waits_for_budget_left_by_the_running_one() -> None:
    sched = PrefillScheduler(PageAllocator(65), PAGE, chunk_tokens=8, max_queued=4)
    sched.submit(job("long", 20))
    assert step(sched) == [("long", 0, 8, False)]
    sched.submit(job("short", 3))
    assert drain(sched) == [[("long", 8, 16, False)], [("long", 16, 20, True), ("short", 0, 3, True)]]


def test_memory_admission_is_fifo_and_released_pages_unblock_the_queue() -> None:
    alloc = PageAllocator(7)  # 6 usable pages of 4 tokens
    sched = PrefillScheduler(alloc, PAGE, chunk_tokens=64, max_queued=4)
    a, b, c = job("a", 16), job("b", 12), job("c", 4)  # 4, 3 and 1 pages
    for j in (a, b, c):
        sched.submit(j)
    assert step(sched) == [("a", 0, 16, True)]
    # b needs 3 pages, 2 are free: b waits, and c (which would fit) waits behind it
    assert step(sched) == [] and b.pages == [] and c.pages == []
    assert sched.load() == WorkerLoadFigures(running=0, queued=2, waiting_for_kv=1, free_pages=2,
                      total_pages=6)
    sched.release(a)
    assert step(sched) == [("b", 0, 12, True), ("c", 0, 4, True)]
    assert alloc.num_free == 2
    sched.release(b)
    sched.release(c)
    assert alloc.num_free == 6


def test_release_frees_pages_in_every_state_and_is_idempotent() -> None:
    alloc = PageAllocator(65)
    sched = PrefillScheduler(alloc, PAGE, chunk_tokens=8, max_queued=4)
    queued, prefilling, sending = job("queued", 40), job("prefilling", 20), job("sending", 6)
    for j in (sending, prefilling, queued):
        sched.submit(j)
    assert step(sched) == [("sending", 0, 6, True), ("prefilling", 0, 2, False)]
    assert (sending.state, prefilling.state, queued.state) == (JobState.SENDING, JobState.PREFILLING,
                                                                JobState.QUEUED)
    assert alloc.num_free == 64 - 2 - 5
    for j in (queued, prefilling, sending):
        sched.release(j)
        sched.release(j)  # a second release must not free the pages twice
        assert j.state is JobState.DONE and j.pages == []
    assert alloc.num_free == 64 and not sched.by_id and not sched.queue and not sched.active
    assert sched.plan() == []  # a released job is never planned again


def test_queue_limit_refuses_with_a_message_and_frees_up_when_jobs_start() -> None:
    sched = PrefillScheduler(PageAllocator(65), PAGE, chunk_tokens=4, max_queued=2)
    sched.submit(job("a", 4))
    sched.submit(job("b", 4))
    with pytest.raises(OverflowError, match=r"prefill queue is full \(2 requests waiting\)"):
        sched.submit(job("c", 4))
    assert "c" not in sched.by_id
    assert step(sched) == [("a", 0, 4, True)]  # a left the queue: there is room again
    sched.submit(job("c", 4))
    assert sched.load().queued == 2


def test_duplicate_request_id_is_refused_until_the_first_is_released() -> None:
    sched = PrefillScheduler(PageAllocator(65), PAGE, chunk_tokens=4, max_queued=4)
    first = job("a", 4)
    sched.submit(first)
    with pytest.raises(ValueError, match="request_id 'a' is already active on this worker"):
        sched.submit(job("a", 4))
    assert sched.by_id["a"] is first and len(sched.queue) == 1
    sched.release(first)
    sched.submit(job("a", 4))


def test_a_prompt_larger_than_the_pool_is_refused_at_submit() -> None:
    alloc = PageAllocator(5)  # 4 pages = 16 tokens
    sched = PrefillScheduler(alloc, PAGE, chunk_tokens=4, max_queued=4)
    sched.submit(job("fits", 16))
    too_big = r"prompt of 17 tokens needs more KV pages than this worker has \(4\)"
    with pytest.raises(ValueError, match=too_big):
        sched.submit(job("big", 17))
    assert list(sched.by_id) == ["fits"]


def test_chunk_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="--chunked-prefill-size must be positive"):
        PrefillScheduler(PageAllocator(5), PAGE, chunk_tokens=0, max_queued=4)


def test_load_counts_each_state() -> None:
    alloc = PageAllocator(65)
    sched = PrefillScheduler(alloc, PAGE, chunk_tokens=8, max_queued=4)
    idle = WorkerLoadFigures(running=0, queued=0, waiting_for_kv=0, free_pages=64,
                      total_pages=64)
    assert sched.load() == idle
    for rid, n in (("sent", 3), ("mid", 30), ("wait1", 5), ("wait2", 5)):
        sched.submit(job(rid, n))
    step(sched)  # sent: final; mid: 5 of 30 tokens
    assert sched.load() == WorkerLoadFigures(running=1, queued=2, waiting_for_kv=1, free_pages=64 - 1 - 8,
                      total_pages=64)


# --------------------------------------------------------------------------- deferred page keys
def cached_sched(pages: int = 65, chunk: int = 64) -> PrefillScheduler:
    alloc = PageAllocator(pages)
    return PrefillScheduler(alloc, PAGE, chunk_tokens=chunk, max_queued=8, cache=PrefixCache(alloc, PAGE))


def with_prompt(rid: str, ids: list[int], salt: str = "") -> PrefillJob:
    j = job(rid, len(ids))
    j.prompt_ids, j.cache_salt = list(ids), salt
    return j


def test_pages_are_keyed_when_the_engine_says_not_at_advance() -> None:
    sched = cached_sched()
    a = with_prompt("a", list(range(10)))
    sched.submit(a)
    step(sched)
    assert sched.cache.num_indexed == 0  # computed, not yet keyed: no hashing between forwards
    sched.key_pages()
    assert sched.cache.num_indexed == 2  # pages [0,4) and [4,8); [8,10) is not whole
    sched.key_pages()  # nothing left to key
    assert sched.cache.num_indexed == 2


def test_a_queued_job_sharing_the_first_page_sees_the_unkeyed_pages() -> None:
    sched = cached_sched()
    a = with_prompt("a", list(range(10)))
    sched.submit(a)
    step(sched)
    other = with_prompt("other", [99] + list(range(1, 12)))  # first page differs: no keying for it
    sched.submit(other)
    assert step(sched) == [("other", 0, 12, True)] and sched.cache.num_indexed == 0
    b = with_prompt("b", list(range(9)) + [50, 51])  # shares a's first two pages
    sched.submit(b)
    assert spans(sched.plan()) == [("b", 8, 11, True)]
    assert b.cached_len == 8 and b.pages[:2] == a.pages[:2] and sched.hit_tokens == 8
    assert sched.cache.num_indexed == 2  # a's pages only: other's first page differs from b's


def test_a_different_salt_does_not_key_for_a_queued_job() -> None:
    sched = cached_sched()
    a = with_prompt("a", list(range(10)), salt="tenant-1")
    sched.submit(a)
    step(sched)
    b = with_prompt("b", list(range(10)), salt="tenant-2")
    sched.submit(b)
    assert spans(sched.plan()) == [("b", 0, 10, True)] and sched.cache.num_indexed == 0


def test_release_keys_the_job_first_so_its_pages_stay_cached() -> None:
    sched = cached_sched()
    a, c = with_prompt("a", list(range(10))), with_prompt("c", [7] * 10)
    sched.submit(a)
    sched.submit(c)
    step(sched)
    sched.release(a)
    cache = sched.cache
    assert cache.num_indexed == 2 and cache.num_cached == 2  # a's two whole pages, c's still unkeyed
    cache.check()
    sched.release(c)
    assert cache.num_indexed == 4 and cache.num_active == 0
    cache.check()


def test_flush_drops_keys_not_yet_made() -> None:
    sched = cached_sched()
    a = with_prompt("a", list(range(10)))
    sched.submit(a)
    step(sched)
    assert sched.flush_cache() == 0  # nothing cached yet; a still holds its pages
    sched.key_pages()
    sched.release(a)
    assert sched.cache.num_indexed == 0 and sched.cache.num_free == sched.cache.num_total
