"""PrefixCache: pages of finished prompt prefixes kept for reuse, on top of the PageAllocator.

Every handed-out page is in one of three states (pure Python, property-tested):

    FREE    in the allocator's free list, no content
    ACTIVE  refs >= 1: some job reads or writes it; keyed once its content is final
    CACHED  refs == 0 and keyed: content valid, in LRU order, evicted when allocation runs short

Keys are the chained page keys of common/serving/page_hash.py; each record keeps its page's token
ids, so a lookup only returns a page whose tokens (and, through the chain, whose whole prefix)
equal the request's. A job's pages are released tail first, so a sequence's deepest pages are
evicted before its shared head.

The successor of a page is the token that followed it when its KV was computed (the next prompt
token, or the first sampled token for the page that ends a prompt). With the MTP draft layer the
draft KV of a page's last slot was computed from that token, so a match whose next token differs
gives up its last page (`check_successor`).

Both roles use it: the prefill worker over prompt pages, the decode worker over the prompt and
output pages of finished requests. `subscribe` reports every change of the index (keys stored,
keys removed, everything cleared) to a listener on the engine thread, for the cache-event stream.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from common.kvcache.allocator import PageAllocator
from common.serving.chain_memo import ChainMemo
from common.serving.page_hash import chain_packed, pack, packed_key, root_key


@dataclass(slots=True)
class PageRecord:
    refs: int = 0
    key: bytes | None = None  # None: not (or no longer) in the index
    tokens: bytes = b""  # the page's token ids as page_hash.pack writes them (compared on a key hit)
    successor: int | None = None


@dataclass
class Match:
    """Pages whose KV a request reuses (a reference taken on each) and their keys."""

    pages: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class IndexChange:
    """One change of the index: `reset` (every earlier key is gone), then `stored`, then `removed`."""

    stored: tuple[bytes, ...] = ()
    removed: tuple[bytes, ...] = ()
    reset: bool = False


Listener = Callable[[IndexChange], None]


class PrefixCache:
    def __init__(self, allocator: PageAllocator, page_size: int, *, enabled: bool = True,
                 check_successor: bool = False, namespace: str = "") -> None:
        """check_successor: the worker runs the MTP draft layer (see the module doc)."""
        self.allocator = allocator
        self.page_size = page_size
        self.enabled = enabled
        self.check_successor = check_successor
        self.namespace = namespace
        self.root = root_key(namespace)
        self._records: dict[int, PageRecord] = {}  # every ACTIVE or CACHED page
        self._index: dict[bytes, int] = {}  # key -> page
        self._lru: OrderedDict[int, None] = OrderedDict()  # CACHED pages, least recently used first
        # the keys of recently keyed prompts: a next turn's match hashes only the pages it adds
        self._memo: ChainMemo | None = ChainMemo() if enabled else None
        self.evictions = 0  # pages evicted since start
        self.mtp_drops = 0  # matched pages given up for a different successor since start
        self._listeners: list[Listener] = []

    # ------------------------------------------------------------------ index changes
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` with every later change of the index (on the thread that changes it: the
        engine thread); returns the unsubscribe function. `keys()` is the state to start from."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def keys(self) -> list[bytes]:
        """Every key findable now."""
        return list(self._index)

    def _tell(self, change: IndexChange) -> None:
        for listener in list(self._listeners):
            listener(change)

    # ------------------------------------------------------------------ sizes
    @property
    def num_total(self) -> int:
        return self.allocator.num_total

    @property
    def num_free(self) -> int:
        """Pages an allocation can get: FREE plus evictable CACHED."""
        return self.allocator.num_free + len(self._lru)

    @property
    def num_cached(self) -> int:
        return len(self._lru)

    @property
    def num_active(self) -> int:
        return len(self._records) - len(self._lru) if self.enabled else self.allocator.num_used

    @property
    def num_indexed(self) -> int:
        return len(self._index)

    def refs(self, page: int) -> int:
        if not self.enabled:
            return int(self.allocator.holds(page))
        rec = self._records.get(page)
        return rec.refs if rec is not None else 0

    def root_for(self, salt: str) -> bytes:
        """The chain root of requests with cache salt `salt` ("" = the shared root): pages keyed under
        one salt never match a request with another."""
        return root_key(self.namespace, salt) if salt else self.root

    # ------------------------------------------------------------------ operations
    def match(self, tokens: Sequence[int], root: bytes | None = None) -> Match:
        """The longest reusable prefix of whole pages, leaving at least one token to compute; `root`
        from root_for (None: the shared root)."""
        m = Match()
        if not self.enabled:
            return m
        ps, parent = self.page_size, root or self.root
        n = (len(tokens) - 1) // ps  # never the page holding the last token
        raw, step = pack(tokens[:n * ps]).tobytes(), 4 * ps
        known: list[bytes] = []
        if n > 1 and self._memo is not None:
            known = self._memo.reuse((parent, ps), packed_key(parent, raw[:step]), lambda: raw, n)
        lookup, records, add_page, add_key, n_known = (self._index.get, self._records, m.pages.append,
                                                        m.keys.append, len(known))
        for i in range(n):
            part = raw[i * step:(i + 1) * step]
            key = known[i] if i < n_known else packed_key(parent, part)
            page = lookup(key)
            if page is None or records[page].tokens != part:
                break
            add_page(page)
            add_key(key)
            parent = key
        if self.check_successor and m.pages and self._records[m.pages[-1]].successor != tokens[len(m.pages) * ps]:
            m.pages.pop()
            m.keys.pop()
            self.mtp_drops += 1
        for page in m.pages:
            self._take(page)
        return m

    def alloc(self, n: int) -> list[int] | None:
        """n new ACTIVE pages (refs 1), evicting least recently used CACHED pages if needed;
        None (changing nothing) when FREE + CACHED is short. Disabled: the allocator's own call (no
        page records, so the cache off costs what the plain allocator does)."""
        if not self.enabled:
            return self.allocator.alloc(n)
        if n > self.num_free:
            return None
        short = n - self.allocator.num_free
        records = self._records
        pages: list[int] = []
        if short > 0:  # evicted pages go straight to the new holder (they stay allocated), first
            pop, index = self._lru.popitem, self._index
            pages = [pop(last=False)[0] for _ in range(short)]
            victims = [records[page] for page in pages]
            removed = [rec.key for rec in victims]
            for key in removed:
                del index[key]
            for rec in victims:
                rec.refs, rec.key, rec.tokens, rec.successor = 1, None, b"", None
            self.evictions += short
            if self._listeners:
                self._tell(IndexChange(removed=tuple(removed)))
        fresh = self.allocator.alloc(n - len(pages))
        assert fresh is not None
        records.update({page: PageRecord(1) for page in fresh})
        return pages + fresh

    def commit(self, pages: Sequence[int], keys: list[bytes], seq: Sequence[int], upto: int,
               root: bytes | None = None) -> None:
        """Key the job's pages lying wholly in seq[:upto] (their KV is now final). `keys` holds the
        keys of the leading pages already keyed or matched and is extended in place; seq may run
        past `upto` (the token after a page is its successor); `root` as in match."""
        if not self.enabled:
            return
        ps, first = self.page_size, len(keys)
        stored = []
        last = min(upto // ps, len(pages))
        if last <= first:
            return
        raw, step = pack(seq[first * ps:last * ps]).tobytes(), 4 * ps
        index, records, n_seq = self._index, self._records, len(seq)
        new = chain_packed(keys[-1] if keys else root or self.root, raw, step)
        keys.extend(new)
        for j, key in enumerate(new):
            if key in index:  # computed twice concurrently: the first copy stays the cached one
                continue
            i = first + j
            rec = records[pages[i]]
            if rec.key is None:
                rec.key, rec.tokens = key, raw[j * step:(j + 1) * step]
                rec.successor = seq[(i + 1) * ps] if (i + 1) * ps < n_seq else None
                index[key] = pages[i]
                stored.append(key)
        if stored and self._listeners:
            self._tell(IndexChange(stored=tuple(stored)))
        if self._memo is not None and upto >= n_seq - 1:  # once per sequence: when its keys reach its end
            self._memo.store((root or self.root, ps), raw if first == 0 else pack(seq[:last * ps]).tobytes(), keys)

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference on each page, tail first; a page nobody holds becomes CACHED if keyed,
        else FREE."""
        if not self.enabled:
            self.allocator.free(list(reversed(pages)))
            return
        freed = []
        for page in reversed(pages):
            rec = self._records[page]
            if rec.refs <= 0:
                raise ValueError(f"page {page} released more often than taken")
            rec.refs -= 1
            if rec.refs:
                continue
            if rec.key is None:
                del self._records[page]
                freed.append(page)
            else:
                self._lru[page] = None
        if freed:
            self.allocator.free(freed)

    def flush(self) -> int:
        """Forget every cached prefix: CACHED pages become FREE, ACTIVE ones leave the index (they
        become FREE on release). Returns the number of pages freed."""
        victims = list(self._lru)
        self._lru.clear()
        for page in victims:
            del self._records[page]
        for rec in self._records.values():
            rec.key = None
        self._index.clear()
        self.allocator.free(victims)
        self._tell(IndexChange(reset=True))
        return len(victims)

    def _take(self, page: int) -> None:
        rec = self._records[page]
        if rec.refs == 0:
            del self._lru[page]
        rec.refs += 1

    # ------------------------------------------------------------------ tests
    def check(self) -> None:
        """Assert the state invariants (tests call it after every operation)."""
        if not self.enabled:
            assert not self._records and not self._index and not self._lru
            return
        assert self.allocator.num_free + len(self._records) == self.allocator.num_total
        assert self.allocator.num_used == len(self._records)
        for page, rec in self._records.items():
            assert rec.refs >= 0
            assert (rec.refs == 0) == (page in self._lru), page
            assert rec.refs > 0 or rec.key is not None, page
            assert rec.key is None or self._index.get(rec.key) == page, page
        for key, page in self._index.items():
            assert self._records[page].key == key
