"""Router: least-loaded choice, round-robin on ties, exclusions, draining, health flags."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.errors import GatewayError
from gateway.router import Router
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
