"""CacheIndex: exact entries from worker events (deltas, resets, a stream ending), approximate
entries from routed prompts (TTL, size bound), and the leading-page match per worker."""

from __future__ import annotations

from common.serving.page_hash import page_key, root_key
from gateway.cache_index import APPROX_NAMESPACE, CacheIndex, PromptKeys
from protos import worker_pb2

NS, PS = "model/bf16/16/5", 16


def keys(tokens: list[int], namespace: str = NS, page_size: int = PS) -> list[bytes]:
    """The worker's chain, computed here independently of PromptKeys."""
    out, parent = [], root_key(namespace)
    for i in range(len(tokens) // page_size):
        parent = page_key(parent, tokens[i * page_size:(i + 1) * page_size])
        out.append(parent)
    return out


def event(stored=(), removed=(), reset=False) -> worker_pb2.CacheEvent:
    return worker_pb2.CacheEvent(reset=reset, stored=list(stored), removed=list(removed), page_size=PS, namespace=NS)


PROMPT = list(range(100, 180))  # 80 tokens: 5 pages, of which 4 can be reused (the last token is computed)


def test_prompt_keys_match_the_worker_chain_and_skip_the_last_page() -> None:
    p = PromptKeys(PROMPT)
    assert p.chain(NS, PS) == keys(PROMPT)[:4]
    assert PromptKeys([*PROMPT, 7]).chain(NS, PS) == keys(PROMPT)  # one token past 5 pages: all 5 reusable
    assert p.chain(NS, 32) == keys(PROMPT, NS, 32)[:2]
    assert p.chain("other", PS) != p.chain(NS, PS)
    salted = PromptKeys(PROMPT, salt="tenant-a").chain(NS, PS)
    assert salted[0] == page_key(root_key(NS, "tenant-a"), PROMPT[:PS]) and salted != p.chain(NS, PS)


def test_events_give_exact_leading_matches_per_worker() -> None:
    idx = CacheIndex(ttl=120)
    k = keys(PROMPT)
    idx.apply("a", event(stored=k[:3], reset=True))
    idx.apply("b", event(stored=[k[0], k[2]], reset=True))  # b lost page 1: only page 0 leads
    p = PromptKeys(PROMPT)
    assert idx.hit("a", p, PS).tokens == 48 and idx.hit("a", p, PS).exact
    assert idx.hit("b", p, PS).tokens == 16
    assert idx.holders[k[0]] == {"a", "b"} and idx.exact_pages == 3
    idx.apply("a", event(removed=[k[1]]))
    assert idx.hit("a", p, PS).tokens == 16
    idx.apply("a", event(stored=k[1:4]))
    assert idx.hit("a", p, PS).tokens == 64  # all 4 reusable pages (the 5th holds the last token)
    idx.apply("a", event(reset=True))  # a flush: nothing held any more
    assert idx.hit("a", p, PS).tokens == 0 and idx.is_live("a")
    assert idx.holders == {k[0]: {"b"}, k[2]: {"b"}}


def test_forget_drops_a_workers_exact_entries_and_falls_back_to_approx() -> None:
    idx = CacheIndex(ttl=120)
    idx.apply("a", event(stored=keys(PROMPT), reset=True))
    idx.forget("a")
    assert not idx.is_live("a") and idx.exact_pages == 0
    hit = idx.hit("a", PromptKeys(PROMPT), PS)
    assert hit.tokens == 0 and not hit.exact


def test_approximate_entries_expire_after_the_ttl() -> None:
    now = [1000.0]
    idx = CacheIndex(ttl=120, clock=lambda: now[0])
    idx.routed("a", PromptKeys(PROMPT), PS)
    turn2 = PROMPT + list(range(500, 540))
    hit = idx.hit("a", PromptKeys(turn2), PS)
    assert hit.tokens == 64 and not hit.exact  # the 4 pages routed before
    assert idx.hit("b", PromptKeys(turn2), PS).tokens == 0
    assert idx.approx_pages == 4
    now[0] += 119
    idx.routed("a", PromptKeys(turn2), PS)  # turn 2 refreshes the shared pages and adds its own
    now[0] += 2  # turn 1's routing is 121 s old, turn 2's 2 s
    assert idx.hit("a", PromptKeys(turn2), PS).tokens == 112
    now[0] += 119
    assert idx.hit("a", PromptKeys(turn2), PS).tokens == 0 and idx.approx_pages == 0


def test_approximate_entries_are_bounded_oldest_first_and_cleared_by_a_flush() -> None:
    idx = CacheIndex(ttl=120, max_approx_pages=6)
    first, second = PROMPT, list(range(300, 380))
    idx.routed("a", PromptKeys(first), PS)
    idx.routed("b", PromptKeys(second), PS)
    assert idx.approx_pages == 6
    assert idx.hit("a", PromptKeys(first), PS).tokens == 0  # its first two pages were dropped: no leading match
    assert idx.hit("b", PromptKeys(second), PS).tokens == 64
    idx.clear()
    assert idx.approx_pages == 0


def test_live_workers_ignore_approximate_entries() -> None:
    idx = CacheIndex(ttl=120)
    idx.routed("a", PromptKeys(PROMPT), PS)
    idx.apply("a", event(reset=True))  # events say it holds nothing: they win
    assert idx.hit("a", PromptKeys(PROMPT), PS).tokens == 0
    assert APPROX_NAMESPACE != NS


def test_keys_are_computed_only_as_far_as_a_lookup_walks() -> None:
    """A miss on the first page hashes a few pages, not the prompt; a later full walk returns the
    same chain as the worker's, the computed head reused."""
    long = list(range(2000, 2000 + 16 * 400 + 3))  # 400 reusable pages
    idx = CacheIndex(ttl=120)
    idx.apply("a", event(stored=keys(PROMPT), reset=True))
    p = PromptKeys(long)
    assert idx.hit("a", p, PS).tokens == 0
    assert len(p._chains[(NS, PS)]) <= 32
    assert p.chain(NS, PS) == keys(long)[:400]
    assert len(p._chains[(NS, PS)]) == 400
