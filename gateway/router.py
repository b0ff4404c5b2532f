"""Choose the (prefill, decode) pair of each request and keep the worker lists healthy.

Least-loaded by the workers' own GetLoad (running + queued + waiting_for_kv) plus what this
gateway dispatched since that reading; round-robin among equals. A health loop polls every
worker each `interval` seconds: a worker that fails GetLoad, or a call with UNAVAILABLE, leaves
the rotation; one that answers again comes back (its WorkerInfo is read again: it may have
restarted with a new worker_id). Draining workers get no new requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

import grpc

from gateway.errors import GatewayError
from gateway.worker_client import WorkerEndpoint

log = logging.getLogger(__name__)


class Router:
    def __init__(self, prefill: Iterable[str], decode: Iterable[str], *, rpc_timeout: float, interval: float,
                 max_message_bytes: int,
                 on_readiness: Callable[[bool], Awaitable[None]] | None = None) -> None:
        self.prefill = [WorkerEndpoint("prefill", a, max_message_bytes) for a in dict.fromkeys(prefill)]
        self.decode = [WorkerEndpoint("decode", a, max_message_bytes) for a in dict.fromkeys(decode)]
        self.rpc_timeout = rpc_timeout
        self.interval = interval
        self._on_readiness = on_readiness
        self._ready: bool | None = None
        self._rr = {"prefill": 0, "decode": 0}
        self._task: asyncio.Task | None = None

    @property
    def workers(self) -> list[WorkerEndpoint]:
        return [*self.prefill, *self.decode]

    @property
    def ready(self) -> bool:
        """At least one healthy, non-draining worker of each role."""
        return bool(self._available(self.prefill, ())) and bool(self._available(self.decode, ()))

    async def start(self) -> None:
        await self.poll_once()
        self._task = asyncio.get_running_loop().create_task(self._health_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await asyncio.gather(*(w.close() for w in self.workers), return_exceptions=True)

    async def poll_once(self) -> None:
        await asyncio.gather(*(w.poll(self.rpc_timeout) for w in self.workers))
        await self._readiness_changed()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll_once()
            except Exception:  # a health loop must never die
                log.exception("health check round failed")

    async def _readiness_changed(self) -> None:
        ready = self.ready
        if ready != self._ready:
            self._ready = ready
            log.info("workers %s", "ready" if ready else "NOT ready (no healthy prefill or decode worker)")
            if self._on_readiness is not None:
                await self._on_readiness(ready)

    def worker_failed(self, worker: WorkerEndpoint, why: str) -> None:
        worker.mark_failed(why)
        if self._ready and not self.ready and self._on_readiness is not None:
            self._ready = False
            t = asyncio.get_running_loop().create_task(self._on_readiness(False))
            t.add_done_callback(lambda _t: None)

    @staticmethod
    def _available(workers: list[WorkerEndpoint], exclude: Iterable[WorkerEndpoint]) -> list[WorkerEndpoint]:
        ex = set(map(id, exclude))
        return [w for w in workers
                if w.healthy and id(w) not in ex and not (w.load is not None and w.load.draining)]

    def _pick(self, role: str, workers: list[WorkerEndpoint], exclude: Iterable[WorkerEndpoint]) -> WorkerEndpoint:
        exclude = list(exclude)
        candidates = self._available(workers, exclude)
        if not candidates:
            def state(w: WorkerEndpoint) -> str:
                if not w.healthy:
                    return "down"
                return "failed this request" if any(w is x for x in exclude) else "draining"
            states = ", ".join(f"{w.address} ({state(w)})" for w in workers)
            raise GatewayError(grpc.StatusCode.UNAVAILABLE, f"no healthy {role} worker available [{states}]")
        best = min(w.score for w in candidates)
        tied = [w for w in candidates if w.score == best]
        chosen = tied[self._rr[role] % len(tied)]
        self._rr[role] += 1
        return chosen

    def choose(self, exclude: Iterable[WorkerEndpoint] = ()) -> tuple[WorkerEndpoint, WorkerEndpoint]:
        """The least-loaded (prefill, decode) pair, skipping `exclude`. UNAVAILABLE when none."""
        exclude = list(exclude)
        return self._pick("prefill", self.prefill, exclude), self._pick("decode", self.decode, exclude)
