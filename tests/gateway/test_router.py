"""Router: least-loaded choice, round-robin on ties, exclusions, draining, health flags; cache-aware
pair choice (session affinity, load threshold, estimated time, local prefill)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from gateway.cache_index import CacheIndex, PromptKeys
from gateway.errors import GatewayError
from gateway.router import Router, RoutingConfig
from protos import worker_pb2


def _router(n_prefill: int, n_decode: int) -> Router:
    r = Router([f"p{i}:1" for i in range(n_prefill)], [f"d{i}:1" for i in range(n_decode)], rpc_timeout=1,
               interval=1, max_message_bytes=1 << 20)
    for w in r.workers:  # as if a health round had succeeded
        w.healthy = True
        w.load = worker_pb2.WorkerLoad()
    return r


def _run(fn):
    async def main():
        return fn()
    return asyncio.run(main())


def test_round_robin_on_ties_then_least_loaded() -> None:
    def body():
        r = _router(2, 3)
        picks = []
        for _ in range(6):
            p, d = r.choose()
            picks.append((p.address, d.address))
            # the router counts what it dispatched until the next GetLoad reading
            p.dispatched_since_poll += 1
            d.dispatched_since_poll += 1
        for w in r.workers:
            w.dispatched_since_poll = 0
        r.decode[0].load.running, r.decode[1].load.waiting_for_kv = 4, 1
        after = [r.choose()[1].address for _ in range(2)]
        return picks, after

    picks, after = _run(body)
    assert sorted(p for p, _ in picks) == ["p0:1"] * 3 + ["p1:1"] * 3
    assert sorted(d for _, d in picks) == ["d0:1", "d0:1", "d1:1", "d1:1", "d2:1", "d2:1"]
    assert after == ["d2:1", "d2:1"]  # least loaded wins while it stays least loaded


def test_exclusions_down_and_draining_workers() -> None:
    def body():
        r = _router(1, 3)
        r.decode[0].healthy = False
        r.decode[1].load.draining = True
        only = {r.choose()[1].address for _ in range(4)}
        with pytest.raises(GatewayError) as ei:
            r.choose(exclude=[r.decode[2]])
        return only, ei.value, r.ready

    only, err, ready = _run(body)
    assert only == {"d2:1"} and ready
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert err.message == \
        "no healthy decode worker available [d0:1 (down), d1:1 (draining), d2:1 (failed this request)]"


def test_readiness_callback_on_worker_failure() -> None:
    async def body():
        seen = []

        async def on_ready(ready: bool) -> None:
            seen.append(ready)

        r = _router(1, 1)
        r._on_readiness = on_ready
        r._ready = True
        r.worker_failed(r.decode[0], "test")
        await asyncio.sleep(0)
        return seen, r.ready

    seen, ready = asyncio.run(body())
    assert seen == [False] and ready is False


# -- cache-aware routing ---------------------------------------------------------------------------

PROMPT = list(range(100, 180))  # 80 tokens: 4 reusable pages of 16
NS = "model/bf16/16/5"


def _cache_router(n_prefill: int, n_decode: int, **routing) -> Router:
    r = _router(n_prefill, n_decode)
    r.routing = RoutingConfig(**routing)
    r.index = CacheIndex(r.routing.approx_ttl)
    return r


def _held(r: Router, worker, pages: int) -> None:
    """`worker` streams events and holds the first `pages` pages of PROMPT."""
    keys = PromptKeys(PROMPT).chain(NS, 16)[:pages]
    r.index.apply(worker.address, worker_pb2.CacheEvent(reset=True, stored=keys, page_size=16, namespace=NS))


def _dispatched(route) -> None:
    """The route's request was sent, and (a session's next turn comes after its answer) its prefill
    compute is done."""
    for w in (route.prefill, route.decode):
        if w is not None:
            w.dispatched_since_poll += 1
    if route.prefill is not None:
        route.prefill.busy_until = 0.0


def test_a_session_stays_on_the_prefill_worker_that_holds_it() -> None:
    def body():
        r = _cache_router(3, 1)
        first = r.route(PROMPT)
        _dispatched(first)
        turn2 = [*PROMPT, *range(600, 640)]
        later = []
        for _ in range(4):
            route = r.route(turn2)
            _dispatched(route)
            later.append((route.prefill.address, route.reason, route.cached_tokens))
        return first, later

    first, later = _run(body)
    assert first.reason == "load" and first.cached_tokens == 0
    # approximate (no events): the gateway remembers where it sent the prefix; load (1..4 above the
    # others, threshold 8) does not move the session
    assert later[0] == (first.prefill.address, "approx", 64)
    assert {p for p, _, _ in later} == {first.prefill.address}
    assert [c for _, _, c in later[1:]] == [112] * 3  # turn 2's own pages count from its second request on


def test_the_load_threshold_moves_a_session_off_a_hot_worker() -> None:
    def body():
        r = _cache_router(2, 1, load_threshold=8)
        _held(r, r.prefill[0], 4)
        _held(r, r.prefill[1], 0)
        near = r.route(PROMPT)
        r.prefill[0].load.running = 9  # 9 above the other: ruled out
        far = r.route(PROMPT)
        return near, far, r

    near, far, r = _run(body)
    assert (near.prefill, near.reason, near.cached_tokens) == (r.prefill[0], "cache", 64)
    assert (far.prefill, far.reason, far.cached_tokens) == (r.prefill[1], "load", 0)


def test_estimated_time_weighs_queued_tokens_against_the_hit() -> None:
    def body():
        r = _cache_router(2, 1)
        _held(r, r.prefill[0], 4)  # 16 uncached tokens there, 80 on prefill[1]
        _held(r, r.prefill[1], 0)
        rate, now = r.routing.default_prefill_rate, time.monotonic() + 60  # queues that stay put for the test
        r.prefill[0].queue_prefill(100, rate, now)
        r.prefill[1].queue_prefill(30, rate, now)
        a = r.route(PROMPT).prefill  # (100 + 16) vs (30 + 80) tokens at one rate: prefill[1]
        queued_1 = r.prefill[1].queued_seconds(now)  # its 80 uncached tokens are queued there now
        r.prefill[0].prefill_rate, r.prefill[1].prefill_rate = 8000.0, 2000.0  # measured
        b = r.route(PROMPT).prefill  # 100 / rate + 16 / 8000 vs 110 / rate + 80 / 2000: prefill[0]
        return a, b, queued_1, r

    a, b, queued_1, r = _run(body)
    assert a is r.prefill[1] and b is r.prefill[0]
    assert abs(queued_1 - 110 / r.routing.default_prefill_rate) < 1e-9


def test_queued_compute_drains_with_time_and_ends_with_the_last_leg() -> None:
    """The estimate of what is queued on a worker falls as its compute should be done (a leg still
    sending KV is no prefill work), and a worker none of whose legs is left is idle, whatever was
    estimated."""
    def body():
        w = _cache_router(1, 1).prefill[0]
        w.queue_prefill(1000, 1000.0, 50.0)  # one second of compute from t = 50
        w.queue_prefill(500, 1000.0, 50.2)  # behind it: until t = 51.5
        seen = (w.queued_seconds(50.5), w.queued_seconds(52.0))
        w.queue_prefill(100, 1000.0, 60.0)  # an idle worker's queue starts now, not at 51.5
        return seen, w.busy_until

    (at_50_5, at_52), until = _run(body)
    assert at_50_5 == pytest.approx(1.0) and at_52 == 0.0 and until == pytest.approx(60.1)


def test_no_hit_anywhere_is_the_plain_load_choice() -> None:
    def body():
        r = _cache_router(2, 2)
        r.prefill[0].load.queued = 3
        routes = [r.route(list(range(i * 100, i * 100 + 40))) for i in range(3)]
        return routes, r

    routes, r = _run(body)
    assert [x.prefill for x in routes] == [r.prefill[1]] * 3 and {x.reason for x in routes} == {"load"}


def test_a_routing_key_keeps_its_workers_until_the_index_knows_the_prompt() -> None:
    def body():
        r = _cache_router(4, 3)
        firsts = {}
        for k, key in enumerate(("session-a", "session-b", "session-c")):
            # different first prompts under one key: the same pair each time, while nobody holds them
            firsts[key] = {(x.prefill.address, x.decode.address, x.reason)
                           for x in (r.route(list(range(1000 * k + 100 * i, 1000 * k + 100 * i + 40)), routing_key=key)
                                     for i in range(3))}
        spread = {(p, d) for s in firsts.values() for p, d, _ in s}
        hot = next(iter(firsts["session-a"]))[0]
        hot_worker = next(w for w in r.prefill if w.address == hot)
        # 4 in flight with this request: within the load threshold (8), past 1.25x the mean
        # (ceil(1.25 * 4 / 4) = 2)
        hot_worker.inflight = 3
        elsewhere = r.route(list(range(5000, 5040)), routing_key="session-a")
        for w in r.prefill:  # everyone busy: 12 with this request, the cap ceil(1.25 * 12 / 4) = 4 fits it
            w.inflight = 3 if w is hot_worker else 2
        back = r.route(list(range(6000, 6040)), routing_key="session-a")
        for w in r.prefill:
            w.inflight = 0
        r.prefill[3].load.running = 9  # over the load threshold: never the key's, however idle in flight
        over = {r.route(list(range(7000 + 100 * i, 7040 + 100 * i)), routing_key="session-a").prefill
                for i in range(3)}
        _held(r, r.prefill[0], 4)
        _held(r, r.prefill[1], 0)
        held = r.route(PROMPT, routing_key="session-b")  # the index knows: the hit wins over the key
        return firsts, spread, hot, elsewhere, back, over, held, r

    firsts, spread, hot, elsewhere, back, over, held, r = _run(body)
    assert all(len(s) == 1 for s in firsts.values()), firsts
    assert {reason for s in firsts.values() for *_, reason in s} == {"key"}
    assert len(spread) > 1  # keys spread over the workers (3 keys, 4 x 3 pairs)
    assert elsewhere.prefill.address != hot and back.prefill.address == hot and back.reason == "key"
    assert len(over) == 1 and r.prefill[3] not in over
    assert (held.prefill, held.reason, held.cached_tokens) == (r.prefill[0], "cache", 64)


def test_a_salted_prompt_is_held_only_under_its_salt() -> None:
    def body():
        r = _cache_router(2, 1)
        keys = PromptKeys(PROMPT, salt="tenant-a").chain(NS, 16)
        r.index.apply(r.prefill[1].address, worker_pb2.CacheEvent(reset=True, stored=keys, page_size=16, namespace=NS))
        _held(r, r.prefill[0], 4)  # the same tokens without a salt
        return r.route(PROMPT, salt="tenant-a"), r.route(PROMPT), r.route(PROMPT, salt="tenant-b"), r

    a, plain, b, r = _run(body)
    assert (a.prefill, a.cached_tokens) == (r.prefill[1], 64)
    assert (plain.prefill, plain.cached_tokens) == (r.prefill[0], 64)
    assert b.cached_tokens == 0 and b.reason == "load"


def test_prefill_rate_is_an_ewma_of_computed_tokens_per_second() -> None:
    def body():
        w = _router(1, 1).prefill[0]
        w.observe_prefill(1000, 0.5)
        first = w.prefill_rate
        w.observe_prefill(1000, 1.0)
        w.observe_prefill(100, 1.0)  # a mostly cached prompt: fixed per-forward cost, no measurement
        return first, w.prefill_rate

    first, second = _run(body)
    assert first == 2000.0 and second == 0.3 * 1000 + 0.7 * 2000


def test_local_prefill_when_decode_holds_all_but_a_short_suffix() -> None:
    def body():
        r = _cache_router(1, 2, local_prefill_max_tokens=32)
        _held(r, r.decode[1], 4)  # 16 tokens uncached
        local = r.route(PROMPT)
        short = r.route([*PROMPT, *range(700, 740)])  # 56 uncached: a prefill leg, decode still by its hit
        r.routing = RoutingConfig(local_prefill_max_tokens=0)
        off = r.route(PROMPT)
        return local, short, off, r

    local, short, off, r = _run(body)
    assert local.prefill is None and local.decode is r.decode[1] and local.reason == "local"
    assert local.cached_tokens == 64
    assert short.prefill is r.prefill[0] and short.decode is r.decode[1]
    assert off.prefill is r.prefill[0] and off.decode is r.decode[1]


def test_cache_routing_off_is_load_routing() -> None:
    def body():
        r = _router(2, 1)
        r.routing = RoutingConfig(cache_aware=False)
        r.index = None
        picks = []
        for _ in range(4):
            route = r.route(PROMPT)
            _dispatched(route)
            picks.append(route.prefill.address)
        return picks

    assert sorted(_run(body)) == ["p0:1", "p0:1", "p1:1", "p1:1"]


def test_an_unmeasured_worker_is_assumed_as_fast_as_the_measured_ones() -> None:
    def body():
        r = _cache_router(2, 1)
        _held(r, r.prefill[0], 4)
        _held(r, r.prefill[1], 0)
        r.prefill[0].prefill_rate = 200.0  # a slow (CPU) worker: 16 / 200 beats 80 / 200, not 80 / 8192
        return r.route(PROMPT).prefill, r

    chosen, r = _run(body)
    assert chosen is r.prefill[0]
