"""CacheWatch: one WatchCache stream per worker, feeding the gateway's CacheIndex.

A stream is opened as soon as the worker is healthy (`WorkerEndpoint.up`); its events go into the index as they come. When it
ends or fails the worker's exact entries are forgotten (the approximate index covers the worker
until the stream is back, which starts with a reset). A worker that does not stream events
(UNIMPLEMENTED: a worker built before the streams existed; FAILED_PRECONDITION: its cache is off) is asked
again only every NO_EVENTS_RETRY_S seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

import grpc

from common.serving import metrics
from gateway.cache_index import CacheIndex
from gateway.worker_client import WorkerEndpoint
from protos import worker_pb2

log = logging.getLogger(__name__)
NO_EVENTS = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION)
NO_EVENTS_RETRY_S = 60.0


class CacheWatch:
    def __init__(self, index: CacheIndex, workers: Iterable[WorkerEndpoint], interval: float) -> None:
        self.index = index
        self.workers = list(workers)
        self.interval = interval
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow(w)) for w in self.workers]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []

    async def _follow(self, worker: WorkerEndpoint) -> None:
        said_no_events = False
        while True:
            await worker.up.wait()
            wait = self.interval
            call = worker.stub.WatchCache(worker_pb2.WatchCacheRequest())
            try:
                async for event in call:
                    self.index.apply(worker.address, event)
                    metrics.router_cache_events_total().inc()
                log.info("%s ended its cache event stream", worker)
            except grpc.aio.AioRpcError as e:
                if e.code() in NO_EVENTS:
                    log.log(logging.DEBUG if said_no_events else logging.INFO,
                            "%s streams no cache events (%s): routing to it uses the approximate index",
                            worker, e.details())
                    said_no_events, wait = True, NO_EVENTS_RETRY_S
                else:
                    log.debug("cache event stream of %s failed: %s", worker, e.code().name)
            except Exception:  # one bad event must not end the watch
                log.exception("cache event stream of %s", worker)
                call.cancel()
            finally:
                self.index.forget(worker.address)
            await asyncio.sleep(wait)
