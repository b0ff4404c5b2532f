"""Choose the (prefill, decode) pair of each request and keep the worker lists healthy.

Load: the workers' own GetLoad (running + queued + waiting_for_kv) plus what this gateway
dispatched since that reading and is still running (a request that ended before any reading saw it
is no load: counting it until the next poll made a worker serving many short requests look up to
one poll interval's worth of requests busier); round-robin among equals. A health loop polls every
worker each `interval` seconds: a worker that fails GetLoad, or a call with UNAVAILABLE, leaves the rotation;
one that answers again comes back (its WorkerInfo is read again: it may have restarted with a new
worker_id). Draining workers get no new requests.

Cache-aware routing (`route`, unless RoutingConfig.cache_aware is off): the gateway's CacheIndex
(gateway/cache_index.py, fed by every worker's WatchCache stream; gateway/cache_watch.py) says how
many leading prompt tokens each worker holds. Among the prefill workers whose load is within
`load_threshold` of the least loaded, the one with the smallest estimated prefill time wins:

    compute this gateway has queued there + prompt tokens it does not hold / its prefill rate

(rate: an EWMA of computed tokens / PrefillResult.compute_seconds; the mean of the measured ones
for a worker not measured yet; queued compute: each routed request's uncached tokens over the rate
then, drained with time — a leg whose compute is done but whose KV is still on its way no longer
counts, as it did when the queue was the tokens of the legs not yet completed). When no worker
holds any page of the prompt the index knows nothing useful and the choice is the routing key's or
the plain load choice. The decode worker is the least loaded, or, where decode workers stream
events, the one holding the most of the prompt within the load threshold; with
`local_prefill_max_tokens`, a decode worker that holds all but at most that many prompt tokens
computes the rest itself and no prefill leg runs.

A request's routing key (OpenAI's `prompt_cache_key`) decides where the index knows nothing: among
the workers within the load threshold, the first in the key's rendezvous-hashing order that stays
within 1.25x the mean in flight (so the first turn of a conversation lands where the next turn will look,
a key moves only when its worker leaves or gets busy, and no worker gets many keys at once). A
cache salt gives the prompt's keys the chain root of that salt.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import grpc

from common.serving import metrics
from common.serving.chain_memo import ChainMemo
from gateway.cache_index import DEFAULT_PAGE_SIZE, CacheIndex, Hit, PromptKeys
from gateway.cache_watch import CacheWatch
from gateway.errors import GatewayError
from gateway.worker_client import WorkerEndpoint
from protos import worker_pb2

log = logging.getLogger(__name__)
KEY_LOAD_SLACK = 0.25  # a routing key's worker may have this much more in flight than the mean


@dataclass(frozen=True)
class RoutingConfig:
    cache_aware: bool = True            # off (--disable-radix-cache): no index, plain load routing
    approx_ttl: float = 120.0           # seconds a routed prompt counts as held by a worker without events
    load_threshold: int = 8             # requests above the least-loaded worker that rule a worker out
    local_prefill_max_tokens: int = 0   # decode computes an uncached suffix up to this long itself (0: never)
    default_prefill_rate: float = 8192.0  # prompt tokens/s assumed before a worker's rate is measured


@dataclass
class Route:
    prefill: WorkerEndpoint | None  # None: the decode worker computes the uncached suffix (local prefill)
    decode: WorkerEndpoint
    reason: str                     # "cache" | "approx" | "key" | "load" | "local"
    cached_tokens: int = 0          # predicted: prompt tokens the chosen worker holds


class Router:
    def __init__(self, prefill: Iterable[str], decode: Iterable[str], *, rpc_timeout: float, interval: float,
                 max_message_bytes: int,
                 on_readiness: Callable[[bool], Awaitable[None]] | None = None,
                 routing: RoutingConfig | None = None) -> None:
        self.prefill = [WorkerEndpoint("prefill", a, max_message_bytes) for a in dict.fromkeys(prefill)]
        self.decode = [WorkerEndpoint("decode", a, max_message_bytes) for a in dict.fromkeys(decode)]
        self.rpc_timeout = rpc_timeout
        self.interval = interval
        self.routing = routing or RoutingConfig()
        self.index = CacheIndex(self.routing.approx_ttl) if self.routing.cache_aware else None
        self.memo = ChainMemo() if self.routing.cache_aware else None  # recent prompts' page keys
        self._watch = CacheWatch(self.index, self.workers, interval) if self.index is not None else None
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
        if self._watch is not None:
            self._watch.start()

    async def close(self) -> None:
        if self._watch is not None:
            await self._watch.close()
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

    async def flush_caches(self) -> dict[str, int | str]:
        """FlushCache on every healthy worker and the gateway's approximate index: address -> pages
        freed, or "unsupported" (a worker without a prefix cache), or "failed: <status>"."""
        async def one(w: WorkerEndpoint) -> int | str:
            try:
                r = await w.stub.FlushCache(worker_pb2.FlushCacheRequest(), timeout=self.rpc_timeout)
                return r.pages_freed
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return "unsupported"
                return f"failed: {e.code().name} {e.details() or ''}".rstrip()
        workers = [w for w in self.workers if w.healthy]
        results = await asyncio.gather(*(one(w) for w in workers))
        if self.index is not None:  # exact entries follow the workers' reset events
            self.index.clear()
            self.report_index()
        return {w.address: r for w, r in zip(workers, results)}

    # ------------------------------------------------------------------ cache-aware routing
    def route(self, input_ids: Sequence[int], exclude: Iterable[WorkerEndpoint] = (), *,
              allow_local: bool = True, routing_key: str | None = None, salt: str = "") -> Route:
        """The pair for a prompt (see the module doc); `allow_local` False: always a prefill leg (the
        retry after a decode worker refused a local prefill). UNAVAILABLE when no pair is left."""
        exclude = list(exclude)
        if self.index is None:
            prefill, decode = self.choose(exclude)
            return Route(prefill, decode, "load")
        prompt = PromptKeys(input_ids, salt, self.memo)
        decode, decode_hit = self._pick_decode(prompt, exclude, routing_key)
        uncached = len(input_ids) - decode_hit.tokens
        limit = self.routing.local_prefill_max_tokens
        if allow_local and limit and decode_hit.exact and decode_hit.tokens and uncached <= limit:
            metrics.router_decisions_total().labels(role="prefill", reason="local").inc()
            prompt.remember()
            return Route(None, decode, "local", decode_hit.tokens)
        prefill, hit, reason = self._pick_prefill(prompt, exclude, routing_key)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("route %d tokens -> %s (%s, %d held); prefill workers %s", len(input_ids), prefill.address,
                      reason, hit.tokens, [(w.address, self.index.hit(w.address, prompt, _page_size(w)).tokens,
                                            w.score, round(w.queued_seconds(time.monotonic()), 4)) for w in self.prefill])
        metrics.router_decisions_total().labels(role="prefill", reason=reason).inc()
        prefill.queue_prefill(len(input_ids) - hit.tokens, self._rate(prefill), time.monotonic())
        self._remember(prefill, prompt)
        prompt.remember()
        return Route(prefill, decode, reason, hit.tokens)

    def _remember(self, prefill: WorkerEndpoint, prompt: PromptKeys) -> None:
        """The approximate entries of a prompt routed to a worker without live events (its whole
        chain: ~1 ms of hashing and bookkeeping for 8K tokens on the event loop). A worker whose
        events are live gets none: its events say what it holds, and if its stream ends the next
        one starts with a snapshot of its whole index (a worker that restarted holds nothing), so
        entries made for it would only cost every request that time."""
        assert self.index is not None
        if not self.index.is_live(prefill.address):
            self.index.routed(prefill.address, prompt, _page_size(prefill))
        self.report_index()

    def _hits(self, workers: list[WorkerEndpoint], prompt: PromptKeys) -> list[Hit]:
        assert self.index is not None
        return [self.index.hit(w.address, prompt, _page_size(w)) for w in workers]

    def _near_least_loaded(self, workers: list[WorkerEndpoint]) -> list[bool]:
        least = min(w.score for w in workers)
        return [w.score <= least + self.routing.load_threshold for w in workers]

    def _by_key(self, workers: list[WorkerEndpoint], routing_key: str) -> WorkerEndpoint:
        """The key's worker: the first in the key's rendezvous order (BLAKE2b of key and address) whose
        requests in flight from this gateway stay within 1 + KEY_LOAD_SLACK of the mean after this one
        (bounded-load consistent hashing: keys stick to their worker, but a few unlucky keys cannot
        pile onto one). In-flight counts, not the load score: the score also counts dispatches since
        the last health poll that may be long finished, which would move keys back and forth."""
        near = [w for w, ok in zip(workers, self._near_least_loaded(workers)) if ok]
        order = sorted(near, key=lambda w: hashlib.blake2b(f"{routing_key}\0{w.address}".encode()).digest(),
                       reverse=True)
        cap = math.ceil((1 + KEY_LOAD_SLACK) * (sum(w.inflight for w in near) + 1) / len(near))
        return next((w for w in order if w.inflight + 1 <= cap), order[0])

    def _pick_prefill(self, prompt: PromptKeys, exclude: list[WorkerEndpoint],
                      routing_key: str | None = None) -> tuple[WorkerEndpoint, Hit, str]:
        """The prefill worker, what it holds of the prompt, and why ("cache", "approx", "key", "load")."""
        candidates = self._available(self.prefill, exclude)
        hits = self._hits(candidates, prompt)
        if not any(h.tokens for h in hits):  # the index knows nothing about this prompt: the key or load decides
            if routing_key and candidates:
                return self._by_key(candidates, routing_key), Hit(0, False), "key"
            return self._pick("prefill", self.prefill, exclude), Hit(0, False), "load"
        n = len(prompt.tokens)
        options = [(self._eta(w, n - h.tokens), w.score, i)
                   for i, (w, h, ok) in enumerate(zip(candidates, hits, self._near_least_loaded(candidates))) if ok]
        best = min(o[:2] for o in options)
        tied = [i for *key, i in options if tuple(key) == best]
        i = tied[self._rr["prefill"] % len(tied)]
        self._rr["prefill"] += 1
        hit = hits[i]
        return candidates[i], hit, "load" if not hit.tokens else "cache" if hit.exact else "approx"

    def _pick_decode(self, prompt: PromptKeys, exclude: list[WorkerEndpoint],
                     routing_key: str | None = None) -> tuple[WorkerEndpoint, Hit]:
        assert self.index is not None
        candidates = self._available(self.decode, exclude)
        live = [w for w in candidates if self.index.is_live(w.address)]
        if live:  # only exact decode hits count: the gateway cannot guess what decode keeps of a request
            hits = self._hits(live, prompt)
            near = self._near_least_loaded(candidates)
            ok = {id(w) for w, fine in zip(candidates, near) if fine}
            scored = [(h.tokens, -w.score, i) for i, (w, h) in enumerate(zip(live, hits)) if id(w) in ok and h.tokens]
            if scored:
                *_, i = max(scored)
                metrics.router_decisions_total().labels(role="decode", reason="cache").inc()
                return live[i], hits[i]
        if routing_key and candidates:
            metrics.router_decisions_total().labels(role="decode", reason="key").inc()
            return self._by_key(candidates, routing_key), Hit(0, False)
        metrics.router_decisions_total().labels(role="decode", reason="load").inc()
        return self._pick("decode", self.decode, exclude), Hit(0, False)

    def _rate(self, worker: WorkerEndpoint) -> float:
        return worker.prefill_rate or self._typical_rate()

    def _eta(self, worker: WorkerEndpoint, uncached: int) -> float:
        return worker.queued_seconds(time.monotonic()) + uncached / self._rate(worker)

    def _typical_rate(self) -> float:
        """The rate of a worker not measured yet: the mean of those measured (one fast default against
        measured CPU-bound rates would send everything to the unmeasured worker), else the default."""
        rates = [w.prefill_rate for w in self.prefill if w.prefill_rate]
        return sum(rates) / len(rates) if rates else self.routing.default_prefill_rate

    def report_index(self) -> None:
        if self.index is not None:
            size = metrics.router_index_pages()
            size.labels(kind="exact").set(self.index.exact_pages)
            size.labels(kind="approx").set(self.index.approx_pages)


def _page_size(worker: WorkerEndpoint) -> int:
    return worker.info.page_size if worker.info is not None and worker.info.page_size else DEFAULT_PAGE_SIZE
