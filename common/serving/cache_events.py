"""CacheEvents: a worker's WatchCache streams, fed by its prefix cache's changes.

The prefix cache changes on the engine thread; `listener` (subscribed with PrefixCache.subscribe)
keeps a mirror of the findable keys and
appends each change to every subscriber's queue (under one lock, so a subscriber's first event --
`reset` with the mirror's keys, the whole index -- and the deltas after it agree; a reset is built
when it is sent, so changes queued behind one are dropped as already covered). Queues are
bounded: a subscriber that falls `max_pending` events behind loses its backlog and gets one `reset`
with the whole index instead, so a slow gateway costs the worker one snapshot, never unbounded
memory. `close()` ends every stream cleanly (a worker calls it when it starts draining, so the
server's graceful stop is not held up by streams that never end).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from protos import worker_pb2

_RESET = None  # a queued reset: the snapshot is built when it is sent


class _Subscriber:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: deque[worker_pb2.CacheEvent | None] = deque([_RESET])
        self.wake = asyncio.Event()


class CacheEvents:
    def __init__(self, page_size: int, namespace: str, max_pending: int = 4096) -> None:
        self.page_size = page_size
        self.namespace = namespace
        self.max_pending = max_pending
        self.resyncs = 0  # snapshots sent to subscribers that fell behind
        self._keys: set[bytes] = set()  # every findable key
        self._subscribers: set[_Subscriber] = set()
        self._lock = threading.Lock()
        self._closed = False

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def listener(self, change: Any) -> None:
        """One prefix-index change (common/kvcache/prefix_index.py IndexChange: `stored`, `removed`,
        `reset`), on the engine thread."""
        stored, removed, reset = list(change.stored), list(change.removed), change.reset
        with self._lock:
            if reset:
                self._keys.clear()
            self._keys.difference_update(removed)
            self._keys.update(stored)
            event = _RESET if reset else self._event(stored=stored, removed=removed)
            for sub in self._subscribers:
                if sub.pending and sub.pending[0] is _RESET:
                    continue  # the snapshot it will send is built at sending time: it covers this change
                if len(sub.pending) >= self.max_pending:
                    sub.pending.clear()
                    self.resyncs += 1
                    sub.pending.append(_RESET)
                else:
                    sub.pending.append(event)
                sub.loop.call_soon_threadsafe(sub.wake.set)

    def _event(self, **fields: object) -> worker_pb2.CacheEvent:
        return worker_pb2.CacheEvent(page_size=self.page_size, namespace=self.namespace, **fields)

    async def stream(self) -> AsyncIterator[worker_pb2.CacheEvent]:
        """The events of one WatchCache call: a reset with the whole index, then deltas, until close()."""
        sub = _Subscriber(asyncio.get_running_loop())
        with self._lock:
            self._subscribers.add(sub)
        try:
            while not self._closed:
                with self._lock:
                    batch = list(sub.pending)
                    sub.pending.clear()
                    batch = [e if e is not _RESET else self._event(reset=True, stored=list(self._keys)) for e in batch]
                for event in batch:
                    yield event
                if not self._closed:
                    await sub.wake.wait()
                    sub.wake.clear()
        finally:
            with self._lock:
                self._subscribers.discard(sub)

    def close(self) -> None:
        """End every stream (any thread)."""
        with self._lock:
            self._closed = True
            for sub in self._subscribers:
                sub.loop.call_soon_threadsafe(sub.wake.set)


# ------------------------------------------------------------------ the two cache RPCs of a worker
async def watch_cache(events: CacheEvents | None, context: Any) -> AsyncIterator[worker_pb2.CacheEvent]:
    """WatchCache of either worker: a reset with the whole index, then what is stored and removed;
    FAILED_PRECONDITION where the prefix cache is off."""
    if events is None:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                            "the prefix cache is off on this worker (--disable-radix-cache)")
    async for event in events.stream():
        yield event


async def flush_cache(flush: Callable[[Callable[[int], None]], None], timeout: float, context: Any,
                      engine: str) -> worker_pb2.FlushCacheResponse:
    """FlushCache of either worker: `flush(reply)` asks its engine thread to forget the prefix cache
    and to call reply(pages freed) from that thread; bounded by `timeout`, though the engine answers
    between two steps (UNAVAILABLE naming `engine` past it)."""
    loop = asyncio.get_running_loop()
    freed: asyncio.Future = loop.create_future()
    flush(lambda n: loop.call_soon_threadsafe(freed.set_result, n))
    try:
        return worker_pb2.FlushCacheResponse(pages_freed=await asyncio.wait_for(freed, timeout))
    except TimeoutError:
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"the {engine} engine did not answer the flush")
