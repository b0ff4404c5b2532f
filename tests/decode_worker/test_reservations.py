"""Reservations: AwaitReserved's waits against the engine thread's reserve/release (CPU, no model)."""

from __future__ import annotations

import asyncio
import threading
import time

from decode_worker.reservations import Reservations, Reserved


class Sink:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def expect(self, transfer_id: int, pages: list[int], cached_tokens: int = 0) -> None:
        self.calls.append(("expect", transfer_id, pages))

    def withdraw(self, transfer_id: int) -> None:
        self.calls.append(("withdraw", transfer_id))


def test_a_wait_without_reservation_times_out_false() -> None:
    res = Reservations()
    assert asyncio.run(res.wait(7, timeout=0.05)) is None


def test_a_transfer_reserved_before_the_wait_answers_at_once() -> None:
    res = Reservations()
    res.reserve(7, [1, 2])
    assert asyncio.run(res.wait(7, timeout=0)) == Reserved()  # no waiting at all


def test_reserving_from_the_engine_thread_wakes_every_waiter_of_that_transfer_only() -> None:
    res = Reservations()

    async def main() -> list[bool]:
        waits = [asyncio.create_task(res.wait(tid, timeout=5.0)) for tid in (7, 7, 8)]
        await asyncio.sleep(0.05)  # all three are waiting
        t = threading.Thread(target=res.reserve, args=(7, [3]))
        t.start()
        t.join()
        done, _ = await asyncio.wait(waits[:2], timeout=2.0)
        assert len(done) == 2, "the reservation did not wake its waiters"
        assert not waits[2].done()
        waits[2].cancel()
        return [w.result() for w in waits[:2]]

    assert asyncio.run(main()) == [Reserved(), Reserved()]


def test_waits_on_two_event_loops() -> None:
    res = Reservations()
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(asyncio.run(res.wait(9, timeout=5.0))))
               for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while len(res._waiters.get(9, [])) < 2:  # both loops are waiting
        assert time.monotonic() < deadline
        time.sleep(0.001)
    res.reserve(9, [4])
    for t in threads:
        t.join(5)
    assert results == [Reserved(), Reserved()]


def test_a_released_reservation_no_longer_answers_and_the_sink_is_told() -> None:
    sink = Sink()
    res = Reservations(sink)
    res.reserve(7, [1, 2])
    res.release(7)
    assert sink.calls == [("expect", 7, [1, 2]), ("withdraw", 7)]
    assert asyncio.run(res.wait(7, timeout=0.05)) is None
    res.release(8)  # never reserved: still withdrawn from the sink, no error
    assert sink.calls[-1] == ("withdraw", 8)


def test_a_timed_out_or_cancelled_wait_leaves_nothing_behind() -> None:
    res = Reservations()

    async def main() -> None:
        assert await res.wait(5, timeout=0.01) is None
        task = asyncio.create_task(res.wait(5, timeout=5.0))
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert res._waiters == {}
    res.reserve(5, [1])  # nobody to wake: the gone loops are not touched


def test_the_answer_carries_the_cache_hit_and_a_decode_computed_one_outlives_release() -> None:
    sink = Sink()
    res = Reservations(sink)
    res.reserve(7, [1, 2, 3], cached_tokens=32)
    res.reserve(8, [4, 5], cached_tokens=16, decode_computes=True)
    assert sink.calls == [("expect", 7, [1, 2, 3])]  # no KV is expected for the decode-computed one
    assert asyncio.run(res.wait(7, timeout=0)) == Reserved(32, False)
    res.release(7)
    res.release(8)  # finished before the prefill worker asked: it must still learn to skip
    assert asyncio.run(res.wait(8, timeout=0)) == Reserved(16, True)
    assert asyncio.run(res.wait(7, timeout=0.01)) is None
