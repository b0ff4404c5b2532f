"""PrefixCache (common/kvcache/prefix_index.py): the matching rules, then a state machine over
random jobs sharing prefixes that checks the page invariants after every step: no page a job holds
is ever evicted or handed out twice, and every page comes back."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from common.kvcache import prefix_index
from common.kvcache.allocator import PageAllocator
from common.kvcache.prefix_index import PrefixCache
from common.serving.page_hash import chain

PAGE = 4


def run_job(cache: PrefixCache, tokens: list[int], successor: int | None = None) -> list[int]:
    """What the prefill scheduler does: match, allocate the rest, compute, key the pages."""
    hit = cache.match(tokens)
    pages = hit.pages + cache.alloc(-(-len(tokens) // PAGE) - len(hit.pages))
    cache.commit(pages, hit.keys, tokens + ([successor] if successor is not None else []), len(tokens))
    return pages


def cached_len(cache: PrefixCache, tokens: list[int]) -> int:
    hit = cache.match(tokens)
    cache.release(hit.pages)
    return len(hit.pages) * PAGE


def test_matching_keeps_whole_pages_and_at_least_one_token() -> None:
    cache = PrefixCache(PageAllocator(32), PAGE)
    seq = list(range(100, 113))  # 3 whole pages + 1 token
    cache.release(run_job(cache, seq))
    assert cache.num_cached == 3 and cache.num_active == 0
    assert cached_len(cache, seq) == 12
    assert cached_len(cache, seq[:12]) == 8  # all cached: the last page is recomputed for the logits
    assert cached_len(cache, seq[:9]) == 8  # page edge + 1
    assert cached_len(cache, seq[:7] + [1, 2, 3]) == 4  # ends inside the second page
    assert cached_len(cache, seq[:3]) == 0  # shorter than a page
    assert cached_len(cache, [7] + seq[1:]) == 0  # the chain breaks at the first page
    assert cached_len(PrefixCache(PageAllocator(32), PAGE, namespace="other"), seq) == 0
    cache.check()


def test_with_mtp_a_page_whose_successor_differs_is_dropped() -> None:
    cache = PrefixCache(PageAllocator(32), PAGE, check_successor=True)
    seq = list(range(100, 108))
    cache.release(run_job(cache, seq, successor=5))  # page 1's draft KV saw 5 after it
    assert cached_len(cache, seq + [5, 6]) == 8
    assert cached_len(cache, seq + [6, 5]) == 4
    assert cached_len(cache, seq[:6] + [0, 0, 0]) == 4  # page 0's successor is seq[4]: kept
    assert cache.mtp_drops == 1
    cache.release(run_job(cache, [1, 2, 3, 4]))  # ends the sequence: successor unknown
    assert cached_len(cache, [1, 2, 3, 4, 9]) == 0
    cache.check()


def test_a_cache_salt_shares_pages_only_with_the_same_salt() -> None:
    cache = PrefixCache(PageAllocator(32), PAGE, namespace="m")
    seq = list(range(100, 109))
    salted = cache.root_for("tenant-a")
    hit = cache.match(seq, salted)
    pages = hit.pages + cache.alloc(3)
    keys: list[bytes] = []
    cache.commit(pages, keys, seq, len(seq), salted)
    cache.release(pages)
    assert cache.root_for("") == cache.root and salted not in (cache.root, cache.root_for("tenant-b"))

    def held(root: bytes | None) -> int:
        m = cache.match(seq, root)
        cache.release(m.pages)
        return len(m.pages) * PAGE

    assert held(salted) == 8 and held(cache.root_for("tenant-a")) == 8
    assert held(None) == 0 and held(cache.root_for("tenant-b")) == 0
    cache.release(run_job(cache, seq))  # unsalted pages of the same tokens are a separate chain
    assert held(None) == 8 and cache.num_cached == 4  # 2 keyed pages each (the third holds the last token)
    cache.check()


def test_a_hash_collision_is_caught_by_the_token_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefix_index, "packed_key", lambda parent, page: b"same")
    monkeypatch.setattr(prefix_index, "chain_packed", lambda parent, raw, step: [b"same"] * (len(raw) // step))
    cache = PrefixCache(PageAllocator(32), PAGE)
    cache.release(run_job(cache, [1, 2, 3, 4, 5]))
    assert cached_len(cache, [1, 2, 3, 4, 5]) == 4
    assert cached_len(cache, [9, 9, 9, 9, 5]) == 0


def test_a_next_turn_hashes_only_its_new_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = PrefixCache(PageAllocator(64), PAGE)
    history = list(range(100, 100 + 10 * PAGE + 2))
    cache.release(run_job(cache, history))
    real, calls = prefix_index.packed_key, [0]

    def counting(parent: bytes, page: bytes) -> bytes:
        calls[0] += 1
        return real(parent, page)

    monkeypatch.setattr(prefix_index, "packed_key", counting)
    nxt = history + list(range(7, 7 + 3 * PAGE))  # the history again, then three pages more
    got = cache.match(nxt)
    assert got.keys == chain(cache.root, nxt, PAGE, 10) and len(got.pages) == 10  # the history's pages
    assert calls[0] == 2  # the first page's key (to find the entry) and the first page past the history
    cache.release(got.pages)
    edited = list(nxt)
    edited[5 * PAGE + 1] = 0  # page 5 differs: pages 0-4 reused, page 5 hashed and missed
    calls[0] = 0
    hit = cache.match(edited)
    assert len(hit.pages) == 5 and calls[0] == 2
    cache.release(hit.pages)
    cache.check()


def test_disabled_it_is_the_plain_allocator() -> None:
    alloc = PageAllocator(8)
    cache = PrefixCache(alloc, PAGE, enabled=False)
    pages = run_job(cache, list(range(9)))
    assert cached_len(cache, list(range(9))) == 0
    assert cache.num_active == alloc.num_used == 3 and all(cache.refs(p) == 1 for p in pages)
    assert not cache._records and cache.num_indexed == 0  # no page bookkeeping beside the allocator's
    cache.check()
    cache.release(pages)
    assert alloc.num_free == alloc.num_total and cache.num_cached == 0 and cache.refs(pages[0]) == 0
    assert cache.alloc(alloc.num_total + 1) is None


def test_allocation_evicts_least_recently_used_tails_first_and_never_held_pages() -> None:
    cache = PrefixCache(PageAllocator(7), PAGE)  # 6 pages
    a = run_job(cache, list(range(12)) + [99])  # 4 pages, 3 keyed
    cache.release(a)
    held = cache.match(list(range(8)) + [50]).pages  # page 0 and 1 of `a` in use again
    assert held == a[:2] and (cache.allocator.num_free, cache.num_cached) == (3, 1)  # a[3] had no key: freed
    got = cache.alloc(4)
    assert got is not None and a[2] in got and not set(held) & set(got) and cache.evictions == 1
    assert cache.alloc(1) is None  # only held pages left: nothing changes
    cache.release(got)
    cache.release(held)
    assert cached_len(cache, list(range(12)) + [1]) == 8  # a[2] was evicted, the head stays
    assert cache.flush() == 2 and cache.num_free == cache.num_total and cache.num_indexed == 0
    cache.check()


class CacheMachine(RuleBasedStateMachine):
    """Jobs over prompts drawn from a few shared stems; each job matches, allocates, commits its
    pages chunk by chunk and releases (finished or aborted at any point)."""

    def __init__(self) -> None:
        super().__init__()
        self.cache = PrefixCache(PageAllocator(11), PAGE, check_successor=True)  # 10 pages: evictions are common
        self.jobs: dict[int, tuple[list[int], list[int], list[bytes], int]] = {}  # id -> pages, seq, keys, done
        self.next_id = 0

    @rule(stem=st.integers(0, 2), cut=st.integers(1, 24), tail=st.lists(st.integers(0, 3), max_size=6))
    def admit(self, stem: int, cut: int, tail: list[int]) -> None:
        seq = ([stem] * 3 + list(range(21)))[:cut] + tail
        hit = self.cache.match(seq)
        held_before = {p for pages, *_ in self.jobs.values() for p in pages}
        new = self.cache.alloc(-(-len(seq) // PAGE) - len(hit.pages))
        if new is None:
            self.cache.release(hit.pages)
            return
        assert not set(new) & held_before and not set(new) & set(hit.pages)  # nothing held is reused
        for p in hit.pages:
            assert self.cache.refs(p) >= 1
        self.jobs[self.next_id] = (hit.pages + new, seq, hit.keys, len(hit.pages) * PAGE)
        self.next_id += 1

    @precondition(lambda self: self.jobs)
    @rule(data=st.data(), n=st.integers(1, 9))
    def compute(self, data: st.DataObject, n: int) -> None:
        jid = data.draw(st.sampled_from(sorted(self.jobs)))
        pages, seq, keys, done = self.jobs[jid]
        done = min(len(seq), done + n)
        self.cache.commit(pages, keys, seq + [7] if done == len(seq) else seq, done)
        self.jobs[jid] = (pages, seq, keys, done)

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        pages = self.jobs.pop(data.draw(st.sampled_from(sorted(self.jobs))))[0]
        self.cache.release(pages)

    @rule()
    def flush(self) -> None:
        self.cache.flush()

    @invariant()
    def consistent(self) -> None:
        self.cache.check()
        held = [p for pages, *_ in self.jobs.values() for p in pages]
        for p in set(held):
            assert self.cache.refs(p) == held.count(p)
        assert self.cache.num_active == len(set(held))

    def teardown(self) -> None:
        for pages, *_ in self.jobs.values():
            self.cache.release(pages)
        self.cache.check()
        assert self.cache.num_active == 0 and self.cache.num_free == self.cache.num_total
        self.cache.flush()
        assert self.cache.allocator.num_free == self.cache.num_total


CacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_page_states = CacheMachine.TestCase
