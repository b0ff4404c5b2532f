"""CacheEvents: a subscriber's first event is the whole index, then deltas in order; a subscriber
that falls behind gets one reset instead of an unbounded backlog; close() ends every stream; the
PrefixCache listener reports commits, evictions and flushes."""

from __future__ import annotations

import asyncio
import threading

from common.kvcache.allocator import PageAllocator
from common.kvcache.prefix_index import IndexChange, PrefixCache
from common.serving.cache_events import CacheEvents


def _k(i: int) -> bytes:
    return i.to_bytes(16, "little")


def _ch(stored: list[bytes], removed: list[bytes], reset: bool) -> IndexChange:
    return IndexChange(tuple(stored), tuple(removed), reset)


def test_first_event_is_the_whole_index_then_deltas() -> None:
    async def body():
        ev = CacheEvents(16, "ns")
        ev.listener(_ch([_k(1), _k(2)], [], False))  # before anyone subscribed
        stream = ev.stream()
        first = await anext(stream)
        threading.Thread(target=ev.listener, args=(_ch([_k(3)], [_k(1)], False),)).start()  # the engine thread
        second = await anext(stream)
        ev.listener(_ch([], [], True))
        third = await anext(stream)
        ev.close()
        rest = [e async for e in stream]
        return first, second, third, rest, ev.subscribers

    first, second, third, rest, subscribers = asyncio.run(asyncio.wait_for(body(), 5))
    assert first.reset and set(first.stored) == {_k(1), _k(2)} and (first.page_size, first.namespace) == (16, "ns")
    assert not second.reset and list(second.stored) == [_k(3)] and list(second.removed) == [_k(1)]
    assert third.reset and list(third.stored) == []  # after a flush nothing is findable
    assert rest == [] and subscribers == 0


def test_a_slow_subscriber_gets_one_reset_instead_of_a_backlog() -> None:
    async def body():
        ev = CacheEvents(16, "ns", max_pending=4)
        stream = ev.stream()
        await anext(stream)  # the initial (empty) reset
        for i in range(10):  # the subscriber reads nothing meanwhile
            ev.listener(_ch([_k(i)], [], False))
        got = await anext(stream)
        ev.listener(_ch([_k(99)], [], False))
        after = await anext(stream)
        ev.close()
        return got, after, ev.resyncs

    got, after, resyncs = asyncio.run(asyncio.wait_for(body(), 5))
    assert resyncs == 1
    assert got.reset and set(got.stored) == {_k(i) for i in range(10)}
    assert list(after.stored) == [_k(99)]


def test_prefix_cache_listener_reports_commits_evictions_and_flushes() -> None:
    seen: list[tuple[list[bytes], list[bytes], bool]] = []
    cache = PrefixCache(PageAllocator(4), 2, namespace="ns")  # 3 pages (page 0 is reserved)
    cache.subscribe(lambda c: seen.append((list(c.stored), list(c.removed), c.reset)))
    pages = cache.alloc(3)
    keys: list[bytes] = []
    cache.commit(pages, keys, [1, 2, 3, 4, 5, 6, 7], 6)
    cache.release(pages)
    assert seen == [(keys, [], False)] and len(keys) == 3
    cache.alloc(1)  # evicts the least recently used: the tail page first
    assert seen[-1] == ([], [keys[2]], False)
    cache.flush()
    assert seen[-1] == ([], [], True)
