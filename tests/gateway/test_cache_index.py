"""CacheIndex: exact entries from worker events (deltas, resets, a stream ending), approximate
entries from routed prompts (TTL, size bound), and the leading-page match per worker."""

from __future__ import annotations

from common.serving.chain_memo import ChainMemo, common_pages
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


# --------------------------------------------------------------------------- the chain memo
def salted_keys(tokens: list[int], salt: str) -> list[bytes]:
    out, parent = [], root_key(NS, salt)
    for i in range(len(tokens) // PS):
        parent = page_key(parent, tokens[i * PS:(i + 1) * PS])
        out.append(parent)
    return out


def hashed_pages(monkeypatch) -> list[int]:  # type: ignore[no-untyped-def]
    """Count the pages PromptKeys hashes through page_hash.chain from now on."""
    from gateway import cache_index

    counted = [0]
    real = cache_index.chain

    def counting(parent, tokens, page_size, pages):  # type: ignore[no-untyped-def]
        counted[0] += pages
        return real(parent, tokens, page_size, pages)

    monkeypatch.setattr(cache_index, "chain", counting)
    return counted


def test_a_next_turn_hashes_only_its_new_pages(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    memo = ChainMemo()
    turn1 = list(range(1000, 1000 + 40 * PS + 5))
    first = PromptKeys(turn1, memo=memo)
    assert first.chain(NS, PS) == keys(turn1)[:40]
    first.remember()
    hashed = hashed_pages(monkeypatch)
    turn2 = turn1 + list(range(7, 7 + 6 * PS))  # the history again, then the new messages
    got = PromptKeys(turn2, memo=memo).chain(NS, PS)
    assert got == keys(turn2)[:len(got)] and len(got) == (len(turn2) - 1) // PS
    assert hashed[0] == len(got) - 40  # the 40 remembered pages were not hashed again


def test_a_prompt_that_diverges_reuses_only_the_pages_before_it(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    memo = ChainMemo()
    base = list(range(50, 50 + 20 * PS + 1))
    p = PromptKeys(base, memo=memo)
    p.chain(NS, PS)
    p.remember()
    hashed = hashed_pages(monkeypatch)
    edited = list(base)
    edited[9 * PS + 3] = 999_999  # page 9 differs (an earlier reasoning dropped, an edited message)
    got = PromptKeys(edited, memo=memo).chain(NS, PS)
    assert got == keys(edited)[:20]
    assert hashed[0] == 20 - 9  # pages 0-8 from the memo, 9-19 hashed


def test_salts_and_page_sizes_keep_their_own_chains() -> None:
    memo = ChainMemo()
    prompt = list(range(300, 300 + 10 * PS + 1))
    a = PromptKeys(prompt, salt="tenant-a", memo=memo)
    a.chain(NS, PS)
    a.remember()
    assert PromptKeys(prompt, salt="tenant-b", memo=memo).chain(NS, PS) == salted_keys(prompt, "tenant-b")[:10]
    assert PromptKeys(prompt, memo=memo).chain(NS, 32) == keys(prompt, NS, 32)[:5]
    assert PromptKeys(prompt, salt="tenant-a", memo=memo).chain(NS, PS) == salted_keys(prompt, "tenant-a")[:10]


def test_the_memo_is_bounded() -> None:
    memo = ChainMemo(max_tokens=30 * PS, per_head=2)
    for n in range(3):  # three prompts with the same first page: only the two latest stay under it
        p = PromptKeys(list(range(10 * PS)) + [n] * (5 * PS) + [1], memo=memo)
        p.chain(NS, PS)
        p.remember()
    assert memo._tokens == 2 * 15 * PS and len(memo._heads) == 1
    other = PromptKeys(list(range(5000, 5000 + 20 * PS + 1)), memo=memo)  # pushes the total past 30 pages
    other.chain(NS, PS)
    other.remember()
    assert memo._tokens <= 30 * PS and len(memo._heads) == 1
    longer = PromptKeys(list(range(5000, 5000 + 25 * PS + 1)), memo=memo)  # extends `other`: replaces it
    longer.chain(NS, PS)
    longer.remember()
    assert memo._tokens == 25 * PS and len(memo._heads) == 1


def testcommon_pages() -> None:
    a = bytes(range(64)) * 4  # 8 pages of 32 bytes
    assert common_pages(a, a, 32, 8) == 8 and common_pages(a, a, 32, 0) == 0
    for page in range(8):
        b = bytearray(a)
        b[page * 32 + 5] ^= 1
        assert common_pages(a, bytes(b), 32, 8) == page
        assert common_pages(a, bytes(b), 32, page) == page


def test_sessions_sharing_a_system_prompt_each_find_their_own_history(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    memo = ChainMemo()
    system = list(range(10_000, 10_000 + 8 * PS))  # 8 pages every session starts with
    turns = {s: system + [s] * (12 * PS) + [1] for s in range(10)}  # 10 sessions, 20 pages each
    for prompt in turns.values():
        p = PromptKeys(prompt, memo=memo)
        p.chain(NS, PS)
        p.remember()
    hashed = hashed_pages(monkeypatch)
    nxt = turns[0] + [2] * (3 * PS)  # the first session's next turn, nine other sessions stored since
    got = PromptKeys(nxt, memo=memo).chain(NS, PS)
    assert got == keys(nxt)[:len(got)] and len(got) == 23
    assert hashed[0] == 3  # its 20 earlier pages came from the memo, not only the 8 shared ones
