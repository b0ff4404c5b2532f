"""The decode worker's prefix cache bookkeeping (decode_worker/scheduler.py over
common/kvcache/prefix_index.py), pure Python: what a finished request keeps, what a reservation
matches, when the suffix is computed here, and a property test of the page states under random
traffic with retractions, aborts, fences and flushes, against a model of every page's content."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from common.kvcache.allocator import PageAllocator
from common.kvcache.prefix_index import PrefixCache
from common.serving.page_hash import pack
from common.serving.sampling_params import SamplingParams
from decode_worker.scheduler import DecodeReq, ReqState, Scheduler

PS = 4


def make(num_pages: int = 33, step_slots: int = 1, local: int = 0, eagle: bool = False,
         enabled: bool = True) -> Scheduler:
    alloc = PageAllocator(num_pages)
    cache = PrefixCache(alloc, PS, enabled=enabled, check_successor=eagle)
    return Scheduler(alloc, PS, max_running=8, max_queued=64, step_slots=step_slots, cache=cache,
                     local_prefill_tokens=local)


def req(rid: str, prompt: list[int], max_tokens: int = 64, local_prefill: bool = False) -> DecodeReq:
    return DecodeReq(rid, hash(rid) % 10**6, list(prompt), SamplingParams(max_tokens=max_tokens), None,  # type: ignore[arg-type]
                     local_prefill=local_prefill)


def arrive(sched: Scheduler, r: DecodeReq, first: int) -> None:
    """The prompt's KV is in (transfer or local prefill) and the first token committed."""
    r.kv_len = r.prompt_len
    r.output_ids.append(first)
    if r in sched.local:
        sched.prefilled_here(r)
    else:
        sched.kv_arrived(r)


def decode(sched: Scheduler, r: DecodeReq, tokens: list[int]) -> None:
    """Plain decode steps: each writes the pending token's KV and commits the next token."""
    for tok in tokens:
        assert not sched.grow([r])
        r.kv_len += 1
        r.output_ids.append(tok)


def test_a_finished_turn_keeps_prompt_and_output_pages_and_the_next_turn_matches_them() -> None:
    sched = make(eagle=True)
    a = req("a", range(100, 110))
    sched.submit(a)
    assert sched.admit() == [a] and a.cached_len == 0
    arrive(sched, a, 200)
    sched.next_batch()
    decode(sched, a, [201, 202, 203, 204, 205, 206])  # KV for 16 tokens: 4 whole pages, 1.5 of them output
    kept = list(a.pages[:4])
    sched.release(a)
    assert sched.cache.num_indexed == 4 and sched.cache.num_cached == 4
    history = a.prompt_ids + a.output_ids
    b = req("b", history + [7, 8])  # 19 tokens; the page ending at 16 is followed by 206 in both
    sched.submit(b)
    sched.admit()
    assert b.cached_len == 16 and b.pages[:4] == kept and len(b.pages) == 5  # 19 + 1 step slot: 1 new page
    assert b.state is ReqState.WAITING_KV and sched.waiting_kv[b.transfer_id] is b
    assert sched.hit_tokens == 16 and sched.query_tokens == 10 + 19
    c = req("c", history[:16] + [9, 9])  # the same 4 pages, another token after them: MTP rule drops one
    sched.submit(c)
    sched.admit()
    assert c.cached_len == 12 and c.pages[:3] == kept[:3] and sched.cache.mtp_drops == 1
    sched.release(b)
    sched.release(c)  # waiting for KV: nothing of theirs is keyed, their matched pages are idle again
    assert sched.cache.num_indexed == 4 and sched.cache.num_free == sched.allocator.num_total
    sched.cache.check()


def test_a_short_uncached_suffix_or_local_prefill_is_computed_here() -> None:
    sched = make(local=4)
    a = req("a", range(8))
    sched.submit(a)
    sched.admit()
    assert a not in sched.local, "nothing cached: the prefill worker computes it"
    arrive(sched, a, 50)
    sched.next_batch()
    decode(sched, a, [51])
    sched.release(a)  # 9 tokens of KV: 2 pages kept
    short, longer = req("s", list(range(8)) + [1, 2, 3]), req("l", list(range(8)) + [1, 2, 3, 4, 5])
    forced = req("f", [9, 9, 9, 9, 9], local_prefill=True)  # nothing cached, no prefill leg: all here
    for r in (short, longer, forced):
        sched.submit(r)
    sched.admit()
    assert [r.cached_len for r in (short, longer, forced)] == [8, 8, 0]
    assert list(sched.local) == [short, forced] and sched.waiting_kv == {longer.transfer_id: longer}
    assert short.computes_here and forced.computes_here and not longer.computes_here
    assert sched.busy  # a local prefill is work in hand
    arrive(sched, short, 60)
    assert short in sched.ready and short not in sched.local and sched.local_prefills == 2
    for r in (short, longer, forced):
        sched.release(r)
    assert sched.cache.num_free == sched.allocator.num_total
    sched.cache.check()


def test_speculative_tokens_past_a_finish_are_never_keyed() -> None:
    sched = make(step_slots=4, eagle=True)
    a = req("a", range(6), max_tokens=3)
    sched.submit(a)
    sched.admit()
    arrive(sched, a, 10)
    sched.next_batch()
    sched.grow([a])
    a.kv_len += 4  # a verify accepted 3 drafts (KV for 4 slots) but the finish came after 2 tokens
    a.output_ids += [11, 12]
    sched.release(a)  # seq = 6 + 3 tokens: KV counts up to position 9 only, so 2 pages
    assert sched.cache.num_indexed == 2


def test_a_failed_request_keeps_nothing_and_a_disabled_cache_behaves_like_the_allocator() -> None:
    sched = make()
    a = req("a", range(9))
    sched.submit(a)
    sched.admit()
    arrive(sched, a, 1)
    sched.release(a, keep=False)
    assert sched.cache.num_indexed == 0 and sched.allocator.num_free == sched.allocator.num_total
    off = make(enabled=False, local=16)
    b, c = req("b", range(9)), req("c", range(9))
    off.submit(b)
    off.admit()
    arrive(off, b, 1)
    off.release(b)
    off.submit(c)
    off.admit()
    assert c.cached_len == 0 and c not in off.local and off.allocator.num_free == off.allocator.num_total - 3


def test_a_retracted_request_gets_its_own_pages_back_from_the_cache() -> None:
    sched = make(num_pages=5)  # 4 usable pages
    a, b = req("a", range(5)), req("b", range(50, 52))
    for r in (a, b):
        sched.submit(r)
    sched.admit()  # a: 2 pages (5 + 1 slot), b: 1 page
    arrive(sched, a, 5)
    arrive(sched, b, 52)
    sched.next_batch()
    decode(sched, a, [6, 7])  # a: KV of 7 tokens in 2 pages
    b.kv_len += 3
    b.output_ids += [53, 54, 55]  # b: KV of 5 slots: needs a second page, then a third
    assert sched.grow([b]) == []
    b.kv_len += 3
    b.output_ids += [56, 57, 58]
    own = list(b.pages)
    assert sched.grow([b]) == [b]  # no page left: the youngest (b) is retracted
    assert b.needs_recompute and b.pages == [] and sched.cache.num_cached == 2  # b's 2 full pages kept
    sched.release(a)
    sched.admit()
    # its history is 8 tokens: the first page comes back, the second holds the last token, which must
    # be computed (the step after needs its hidden state)
    assert b.cached_len == 4 and b.pages[0] == own[0] and b.history() == [50, 51, 52, 53, 54, 55, 56, 57]
    sched.cache.check()


def test_pages_released_behind_a_fence_stay_held_until_it_lifts() -> None:
    sched = make()
    a = req("a", range(8))
    sched.submit(a)
    sched.admit()
    arrive(sched, a, 8)
    fence = sched.raise_fence()
    pages = list(a.pages)
    sched.release(a)
    assert all(sched.cache.refs(p) == 1 for p in pages) and sched.cache.num_indexed == 2
    sched.lift_fence(fence)
    assert sched.cache.num_cached == 2 and sched.cache.num_free == sched.allocator.num_total


def test_index_changes_reach_a_subscriber() -> None:
    sched = make(num_pages=4)  # 3 usable pages
    seen = []
    unsubscribe = sched.cache.subscribe(seen.append)
    a = req("a", range(8))
    sched.submit(a)
    sched.admit()
    arrive(sched, a, 8)
    sched.release(a)
    assert [len(c.stored) for c in seen] == [2] and set(seen[0].stored) == set(sched.cache.keys())
    b = req("b", range(100, 108))  # needs all 3 pages: both cached ones are evicted
    sched.submit(b)
    sched.admit()
    assert set(seen[1].removed) == set(seen[0].stored)
    sched.cache.flush()
    assert seen[-1].reset
    unsubscribe()
    sched.release(b)
    assert len(seen) == 3


# ---------------------------------------------------------------------------------------------- property
OPS = ("submit",) * 3 + ("admit",) * 3 + ("arrive",) * 3 + ("step",) * 5 + ("finish", "finish", "abort", "fence",
                                                                               "lift", "lift")


@settings(max_examples=40, deadline=None)
@given(st.data(), st.booleans(), st.integers(1, 4))
def test_page_states_under_random_traffic(data, eagle: bool, step_slots: int) -> None:
    """Invariants after every operation: the cache's own (states partition the pool, index and
    records agree); every keyed page holds exactly the tokens its key names (so a match never
    returns wrong KV); a live request's pages hold its sequence up to kv_len (so no page in use was
    ever evicted and reused, nor written by another request); only a request's own unshared pages
    are written. At the end every page returns."""
    total = 12
    sched = make(num_pages=total + 1, step_slots=step_slots, local=data.draw(st.integers(0, 6)), eagle=eagle)
    content: dict[int, list[int | None]] = {}
    live: list[DecodeReq] = []
    fences: list[list[int]] = []
    bases = [[i * 100 + j for j in range(12)] for i in range(3)]  # and every finished sequence
    counter = iter(range(10**6))

    def write(r: DecodeReq, lo: int, tokens: list[int]) -> None:
        for k, tok in enumerate(tokens):
            p = lo + k
            page = r.pages[p // PS]
            assert sched.cache.refs(page) == 1, "a shared page was written"
            content.setdefault(page, [None] * PS)[p % PS] = tok

    def seq(r: DecodeReq) -> list[int]:
        return r.prompt_ids + r.output_ids

    def end(r: DecodeReq, keep: bool = True) -> None:
        sched.release(r, keep)
        live.remove(r)
        if r.output_ids:
            bases.append(seq(r))

    for _ in range(data.draw(st.integers(5, 120))):
        op = data.draw(st.sampled_from(OPS + (("flush",) if data.draw(st.integers(0, 30)) == 0 else ())))
        if op == "submit" and len(sched.waiting_memory) < 4:
            base = data.draw(st.sampled_from(bases))
            cut = data.draw(st.integers(max(1, len(base) - 6), len(base)))
            prompt = base[:cut] + data.draw(st.lists(st.integers(0, 9), max_size=5))
            r = req(f"r{next(counter)}", prompt, max_tokens=data.draw(st.integers(1, 12)),
                    local_prefill=data.draw(st.booleans()))
            if sched.pages_for(r.prompt_len + step_slots) <= total:
                sched.submit(r)
                live.append(r)
        elif op == "admit":
            for r in sched.admit():
                if r.needs_recompute:  # the engine rebuilds its KV after the cached prefix
                    write(r, r.cached_len, r.history()[r.cached_len:])
                    r.kv_len = len(r.history())
                    r.needs_recompute = False
        elif op == "arrive":
            waiting = list(sched.waiting_kv.values()) + list(sched.local)
            if waiting:
                r = data.draw(st.sampled_from(waiting))
                write(r, r.cached_len, r.prompt_ids[r.cached_len:])
                arrive(sched, r, data.draw(st.integers(0, 9)))
        elif op == "step":
            batch = sched.next_batch()
            if batch and not fences:  # retraction only happens with no step in flight
                sched.grow(batch)  # may retract: pages released, kv_len kept for re-admission
                for r in [r for r in batch if r.state is ReqState.RUNNING]:
                    if r.needs_recompute:
                        continue
                    write(r, r.kv_len, [-1] * step_slots)  # the step's scratch slots
                    a = data.draw(st.integers(0, step_slots - 1))
                    new = [data.draw(st.integers(0, 9)) for _ in range(a + 1)]
                    write(r, r.kv_len, [r.pending] + new[:a])
                    r.kv_len += a + 1
                    room = r.params.max_tokens - len(r.output_ids)
                    r.output_ids += new[:max(room, 1)]
                    if len(r.output_ids) >= r.params.max_tokens:
                        end(r)
        elif op in ("finish", "abort") and live:
            r = data.draw(st.sampled_from(live))
            if op == "finish" and r.state is not ReqState.RUNNING:
                continue
            end(r, keep=data.draw(st.booleans()) if op == "abort" else True)
        elif op == "fence":
            fences.append(sched.raise_fence())
        elif op == "lift" and fences:
            sched.lift_fence(fences.pop(0))
        elif op == "flush":
            sched.cache.flush()

        sched.cache.check()
        for page in sched.cache._index.values():
            assert bytes(pack(content[page])) == sched.cache._records[page].tokens, "a keyed page holds other KV"
        for r in live:
            assert len(set(r.pages)) == len(r.pages)
            assert all(sched.cache.refs(p) >= 1 for p in r.pages), "a page in use is not referenced"
            s = seq(r)
            for p in range(min(r.kv_len, len(s)) if r.pages else 0):  # a retracted one holds nothing
                assert content[r.pages[p // PS]][p % PS] == s[p], "a page in use lost its KV"

    for r in live:
        sched.release(r)
    for f in fences:
        sched.lift_fence(f)
    assert sched.cache.num_free == total and sched.cache.num_active == 0
    sched.cache.flush()
    assert sched.allocator.num_free == total
