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


class ChainMemo:
    """The page keys of recently routed prompts, so that a prompt extending one of them (the next
    turn of a conversation or an agent loop resends the whole history) hashes only its new pages.

    An entry is a prompt's tokens, packed as page_hash.pack does, and the keys computed for it under
    one chain (namespace, page size, salt), found by the key of its first page; the pages it shares
    with a new prompt are found by comparing the packed tokens, so a reused key always belongs to the
    same tokens. Sessions that share a system prompt share a first page: an entry the new prompt
    extends whole is found by comparing one page at the entry's end, and only the two most recent
    entries are bisected for a partial match. At most `per_head` entries per first page (the most
    recent), `max_tokens` in all (least recently stored dropped first)."""

    def __init__(self, max_tokens: int = 1 << 23, per_head: int = 16) -> None:
        self.max_tokens = max_tokens
        self.per_head = per_head
        self._heads: OrderedDict[tuple[str, int, str, bytes], list[tuple[bytes, list[bytes]]]] = OrderedDict()
        self._tokens = 0

    def reuse(self, chain_id: tuple[str, int, str], first: bytes, packed: Callable[[], bytes],
              pages: int) -> list[bytes]:
        """Keys of the longest run of leading pages (at most `pages`) of a prompt that an entry under
        the same chain and first-page key (`first`) shares; `packed()` gives the prompt's packed
        tokens, asked for only when there is an entry to compare with."""
        entries = self._heads.get((*chain_id, first))
        if not entries:
            return []
        raw, step = packed(), 4 * chain_id[1]
        best: list[bytes] = []
        for old_raw, old_keys in entries:  # one the prompt extends whole: the longest such
            n = min(pages, len(old_keys))
            if n > len(best) and raw[(n - 1) * step:n * step] == old_raw[(n - 1) * step:n * step] \
                    and raw[:n * step] == old_raw[:n * step]:
                best = old_keys[:n]
        if best:
            return best
        for old_raw, old_keys in entries[:2]:  # else the longest common part of the latest two
            n = _common_pages(raw, old_raw, step, min(pages, len(old_keys)))
            if n > len(best):
                best = old_keys[:n]
        return best

    def store(self, chain_id: tuple[str, int, str], raw: bytes, keys: list[bytes]) -> None:
        """Remember `keys`, the leading pages' keys of the packed prompt `raw` under `chain_id`."""
        if len(keys) < 2:
            return  # one page is one hash: nothing worth keeping
        head = (*chain_id, keys[0])
        entries = self._heads.pop(head, [])
        entries.insert(0, (raw[:len(keys) * 4 * chain_id[1]], keys))
        for dropped in entries[self.per_head:]:
            self._tokens -= len(dropped[0]) // 4
        del entries[self.per_head:]
        self._heads[head] = entries
        self._tokens += len(entries[0][0]) // 4
        while self._tokens > self.max_tokens and self._heads:
            _, old = self._heads.popitem(last=False)
            self._tokens -= sum(len(r) // 4 for r, _ in old)


def _common_pages(a: bytes, b: bytes, step: int, limit: int) -> int:
    """How many leading `step`-byte pages a and b share, at most `limit`: one comparison when the
    whole range is equal (a conversation's next turn), else a bisection that compares each byte at
    most twice."""
    if a[:limit * step] == b[:limit * step]:  # bytes slices: a copy and a memcmp (a memoryview compares per item)
        return limit
    lo, hi = 0, limit  # pages [0, lo) equal; some page in [lo, hi) differs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo * step:mid * step] == b[lo * step:mid * step]:
            lo = mid
        else:
            hi = mid
    return lo  # [lo, lo + 1) holds a differing page


class PromptKeys:
    """One prompt's page keys under each (namespace, page size) asked for, each computed once and
    only as far as a lookup walked (a prompt nobody holds costs one key per worker, not its chain);
    with a `memo`, keys an earlier prompt shared are taken from it rather than hashed again (`done`
    gives this prompt's keys back to the memo).
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
