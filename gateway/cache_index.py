"""The gateway's view of which worker holds which prompt pages (cache-aware routing).

Exact part: page key -> the workers holding it, built from the workers' WatchCache events (a
`reset` replaces everything a worker said before). Approximate part, for workers without a live
event stream (the RPC is UNIMPLEMENTED, the prefix cache is off, or the stream broke): the pages
of the prompts this gateway itself routed there, each kept for `ttl` seconds, at most
`max_approx_pages` in all (least recently routed dropped first).

Keys are common/serving/page_hash.py chains. A worker keys pages under its own namespace and page
size (CacheEvent.namespace / page_size); approximate entries use the worker's page size from
GetInfo and a namespace of the gateway's own, since only the gateway compares them.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from common.serving.chain_memo import ChainMemo
from common.serving.page_hash import chain, pack, packed_key, root_key
from protos import worker_pb2

APPROX_NAMESPACE = "glmserve-gateway-approx"
DEFAULT_PAGE_SIZE = 16


@dataclass
class _Live:
    """A worker whose event stream is up: its key chain and the keys it holds."""
    page_size: int
    namespace: str
    keys: set[bytes]


@dataclass(frozen=True)
class Hit:
    tokens: int   # leading prompt tokens the worker holds (whole pages, at most len(prompt) - 1)
    exact: bool   # from the worker's events (else from what this gateway routed there)


class PromptKeys:
    """One prompt's page keys under each (namespace, page size) asked for, each computed once and
    only as far as a lookup walked (a prompt nobody holds costs one key per worker, not its chain);
    with a `memo`, keys an earlier prompt shared are taken from it rather than hashed again
    (`remember` gives this prompt's keys back to it).
    `salt` is the request's cache salt: its chains start where the workers' chains of that salt do."""

    def __init__(self, tokens: Sequence[int], salt: str = "", memo: ChainMemo | None = None) -> None:
        self.tokens = tokens
        self.salt = salt
        self.memo = memo
        self._chains: dict[tuple[str, int], list[bytes]] = {}
        self._raw: bytes | None = None

    def chain(self, namespace: str, page_size: int) -> list[bytes]:
        """Keys of the pages a worker could reuse: never the page holding the last token."""
        return list(self.walk(namespace, page_size))

    def remember(self) -> None:
        """Give the keys computed for this prompt to the memo (after routing it)."""
        if self.memo is not None:
            for (namespace, page_size), keys in self._chains.items():
                if len(keys) > 1:  # the tokens packed only as far as the keys go (a cold prompt: a few pages)
                    raw = self._raw if self._raw is not None else pack(self.tokens[:len(keys) * page_size]).tobytes()
                    self.memo.store((namespace, page_size, self.salt), raw, keys)

    def _packed(self) -> bytes:
        if self._raw is None:
            self._raw = pack(self.tokens).tobytes()
        return self._raw

    def walk(self, namespace: str, page_size: int) -> Iterator[bytes]:
        """`chain`'s keys one by one, computing (and keeping) only those the caller reaches."""
        done = self._chains.setdefault((namespace, page_size), [])
        yield from done
        pages = (len(self.tokens) - 1) // page_size
        if not done and pages > 1 and self.memo is not None:
            chain_id = (namespace, page_size, self.salt)
            first = packed_key(root_key(namespace, self.salt), pack(self.tokens[:page_size]))
            done.extend(self.memo.reuse(chain_id, first, self._packed, pages) or [first])
            yield from done
        step = 32  # keys computed at a time past those kept
        while len(done) < pages:
            start = len(done)
            parent = done[-1] if done else root_key(namespace, self.salt)
            n = min(step, pages - start)
            more = chain(parent, self.tokens[start * page_size:(start + n) * page_size], page_size, n)
            done.extend(more)
            yield from more
            step *= 4


class CacheIndex:
    def __init__(self, ttl: float, max_approx_pages: int = 1 << 18,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_approx_pages = max_approx_pages
        self.clock = clock
        self.holders: dict[bytes, set[str]] = {}  # exact: key -> workers
        self._live: dict[str, _Live] = {}
        # approximate: (worker, key) -> expiry, oldest routed first
        self._approx: OrderedDict[tuple[str, bytes], float] = OrderedDict()
        self.events_received = 0

    # ------------------------------------------------------------------ events
    def apply(self, worker: str, event: worker_pb2.CacheEvent) -> None:
        """One event of `worker`'s stream (its first must be a reset)."""
        self.events_received += 1
        live = self._live.get(worker)
        if event.reset or live is None:
            self.forget(worker)
            live = self._live[worker] = _Live(event.page_size or DEFAULT_PAGE_SIZE, event.namespace, set())
        for key in event.removed:
            if key in live.keys:
                live.keys.discard(key)
                holders = self.holders[key]
                holders.discard(worker)
                if not holders:
                    del self.holders[key]
        for key in event.stored:
            if key not in live.keys:
                live.keys.add(key)
                self.holders.setdefault(key, set()).add(worker)

    def forget(self, worker: str) -> None:
        """`worker`'s stream ended: its exact entries go (the approximate index covers it again)."""
        live = self._live.pop(worker, None)
        if live is None:
            return
        for key in live.keys:
            holders = self.holders[key]
            holders.discard(worker)
            if not holders:
                del self.holders[key]

    def is_live(self, worker: str) -> bool:
        return worker in self._live

    # ------------------------------------------------------------------ approximate
    def routed(self, worker: str, prompt: PromptKeys, page_size: int) -> None:
        """This gateway sent `prompt` to `worker`: remember its pages there for `ttl` seconds (also
        for a worker whose events are live: they are what is left if its stream ends)."""
        expiry = self.clock() + self.ttl
        for key in prompt.chain(APPROX_NAMESPACE, page_size):
            entry = (worker, key)
            self._approx[entry] = expiry
            self._approx.move_to_end(entry)
        while len(self._approx) > self.max_approx_pages:
            self._approx.popitem(last=False)

    def expire(self) -> None:
        now = self.clock()
        while self._approx:
            entry, expiry = next(iter(self._approx.items()))
            if expiry > now:
                break
            del self._approx[entry]

    # ------------------------------------------------------------------ queries
    def hit(self, worker: str, prompt: PromptKeys, page_size: int) -> Hit:
        """How much of `prompt` `worker` holds: exact when its events are live, else approximate."""
        live = self._live.get(worker)
        if live is not None:
            n = 0
            for key in prompt.walk(live.namespace, live.page_size):
                if worker not in self.holders.get(key, ()):
                    break
                n += 1
            return Hit(n * live.page_size, True)
        self.expire()
        n = 0
        for key in prompt.walk(APPROX_NAMESPACE, page_size):
            if (worker, key) not in self._approx:
                break
            n += 1
        return Hit(n * page_size, False)

    def clear(self) -> None:
        """After a flush: the approximate entries go; exact ones follow the workers' reset events."""
        self._approx.clear()

    @property
    def exact_pages(self) -> int:
        return len(self.holders)

    @property
    def approx_pages(self) -> int:
        return len(self._approx)
