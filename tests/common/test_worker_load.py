"""Load figures, the same fields for both worker roles: what each scheduler counts, and the GetLoad
reply built from them."""

from __future__ import annotations

from common.kvcache.allocator import PageAllocator
from common.serving.sampling_params import SamplingParams
from common.worker.base import load_proto
from common.worker.load import WorkerLoadFigures
from decode_worker.scheduler import DecodeReq, Scheduler
from prefill_worker.scheduler import PrefillJob, PrefillScheduler


def test_load_proto_copies_every_figure() -> None:
    figures = WorkerLoadFigures(running=3, queued=2, waiting_for_kv=4, free_pages=11, total_pages=20)
    msg = load_proto(figures, draining=True)
    assert (msg.running, msg.queued, msg.waiting_for_kv, msg.free_pages, msg.total_pages, msg.draining) == \
        (3, 2, 4, 11, 20, True)
    assert not load_proto(figures, draining=False).draining


def _decode_req(rid: str, tid: int, prompt: int) -> DecodeReq:
    return DecodeReq(rid, tid, list(range(prompt)), SamplingParams(max_tokens=4), None)  # type: ignore[arg-type]


def test_decode_scheduler_counts_each_stage() -> None:
    alloc = PageAllocator(9)  # 8 usable pages of 4 tokens
    sched = Scheduler(alloc, page_size=4, max_running=1, max_queued=8, step_slots=1)
    assert sched.load() == WorkerLoadFigures(0, 0, 0, 8, 8) and not sched.busy
    a, b, c, d = (_decode_req(n, i + 1, 7) for i, n in enumerate("abcd"))  # 2 pages each
    for r in (a, b, c, d):
        sched.submit(r)
    assert sched.load() == WorkerLoadFigures(running=0, queued=4, waiting_for_kv=0, free_pages=8, total_pages=8)
    sched.admit()
    assert sched.load() == WorkerLoadFigures(running=0, queued=0, waiting_for_kv=4, free_pages=0, total_pages=8)
    assert not sched.busy, "waiting for KV is no work for the engine"
    sched.kv_arrived(a)
    sched.kv_arrived(b)
    assert sched.busy  # ready requests are work in hand
    sched.next_batch()  # max_running 1: a runs, b stays ready (counted as waiting for KV)
    assert sched.load() == WorkerLoadFigures(running=1, queued=0, waiting_for_kv=3, free_pages=0, total_pages=8)
    sched.release(a)
    assert sched.load().free_pages == 2 and sched.load().running == 0


def _job(rid: str, prompt: int) -> PrefillJob:
    return PrefillJob(rid, 1, list(range(prompt)), SamplingParams(max_tokens=4), sender=None,
                      on_done=lambda job, error: None)


def test_prefill_scheduler_counts_each_stage() -> None:
    alloc = PageAllocator(9)
    sched = PrefillScheduler(alloc, page_size=4, chunk_tokens=8, max_queued=8)
    long, short = _job("long", 12), _job("short", 4)
    sched.submit(long)
    sched.submit(short)
    assert sched.load() == WorkerLoadFigures(running=0, queued=2, waiting_for_kv=0, free_pages=8, total_pages=8)
    assert not sched.busy
    chunks = sched.plan()  # the whole budget goes to the first 8 tokens of `long`
    assert [c.job for c in chunks] == [long]
    assert sched.load() == WorkerLoadFigures(running=1, queued=1, waiting_for_kv=0, free_pages=5, total_pages=8)
    assert sched.busy
    for c in chunks:
        sched.advance(c)
    for c in sched.plan():  # long's last 4 tokens and all of short
        sched.advance(c)
    assert sched.load() == WorkerLoadFigures(running=0, queued=0, waiting_for_kv=2, free_pages=4, total_pages=8)
    assert sched.busy, "jobs waiting for the decode side still hold pages"
