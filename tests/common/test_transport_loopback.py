"""The in-process fake transport: production semantics of the reservation table, no groups."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from common.transport.base import KVPoll, PairBroken
from common.transport.loopback import LoopbackSender
from common.transport.receiver import ReservationTable


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_chunk(self, tid: int, seq: int, layers: tuple[int, int], tokens: tuple[int, int],
                 heads: tuple[int, int], payload: torch.Tensor):
        self.events.append(("chunk", tid, seq, layers, tokens, payload))

    def on_last(self, tid: int, aux: bytes) -> None:
        self.events.append(("last", tid, aux))

    def on_failed(self, tid: int, reason: str) -> None:
        self.events.append(("failed", tid, reason))


@pytest.fixture
def fake():
    sink = Sink()
    table = ReservationTable(sink, transfer_timeout_s=60)
    done: list[tuple[int, bool, Any]] = []
    stats: list[Any] = []
    sender = LoopbackSender(table, lambda t, ok, err: done.append((t, ok, err)), on_stats=stats.append)
    yield sink, table, sender, done, stats
    sender.close()
    table.close()


def kv(layers: int, tokens: int, fill: float) -> torch.Tensor:
    return torch.full((layers, 2, tokens, 2, 4), fill, dtype=torch.bfloat16)


def test_chunks_arrive_in_order_and_the_transfer_completes(fake) -> None:
    sink, table, sender, done, stats = fake
    table.reserve(1)
    assert table.state(1) == KVPoll.WaitingForInput
    sender.submit(1, 0, (0, 2), (0, 3), kv(2, 3, 1.0), False)
    assert table.state(1) == KVPoll.Transferring and sender.poll(1) == KVPoll.Transferring
    sender.submit(1, 1, (2, 3), (0, 3), kv(1, 3, 2.0), True, aux=b"rec")
    assert [e[:5] for e in sink.events[:2]] == [("chunk", 1, 0, (0, 2), (0, 3)), ("chunk", 1, 1, (2, 3), (0, 3))]
    assert torch.all(sink.events[1][5] == 2.0)
    assert sink.events[2] == ("last", 1, b"rec")
    assert done == [(1, True, None)] and sender.poll(1) == KVPoll.Success
    assert stats[0].ok and stats[0].bytes == (2 * 3 + 1 * 3) * 2 * 2 * 4 * 2 and stats[0].chunks == 2
    assert len(table) == 0


def test_unknown_transfer_is_dropped_and_the_next_one_goes_through(fake) -> None:
    sink, table, sender, done, _ = fake
    table.reserve(2)
    sender.submit(99, 0, (0, 1), (0, 1), kv(1, 1, 5.0), True)
    sender.submit(2, 0, (0, 1), (0, 1), kv(1, 1, 6.0), True)
    assert [e[0:2] for e in sink.events] == [("chunk", 2), ("last", 2)]
    assert (99, True, None) in done and (2, True, None) in done


def test_break_pair_fails_transfers_in_flight_on_both_sides(fake) -> None:
    sink, table, sender, done, _ = fake
    table.reserve(3)
    table.reserve(4)
    sender.submit(3, 0, (0, 1), (0, 2), kv(1, 2, 1.0), False)
    assert sender.break_pair("link down") == [3]
    assert sink.events[-1] == ("failed", 3, "loopback pair broken: link down")
    assert done[-1][0] == 3 and not done[-1][1] and isinstance(done[-1][2], PairBroken)
    sender.submit(3, 1, (0, 1), (2, 4), kv(1, 2, 1.0), True)  # late chunk of a failed transfer: dropped
    sender.submit(4, 0, (0, 1), (0, 2), kv(1, 2, 1.0), True)
    assert sink.events[-1] == ("last", 4, b"") and [e for e in sink.events if e[1] == 3][-1][0] == "failed"


def test_cancel_on_decode_then_more_chunks_are_drained(fake) -> None:
    sink, table, sender, _, _ = fake
    table.reserve(5)
    sender.submit(5, 0, (0, 1), (0, 2), kv(1, 2, 1.0), False)
    assert table.cancel(5, "client gone")
    sender.submit(5, 1, (0, 1), (2, 4), kv(1, 2, 1.0), True)
    assert [e[0] for e in sink.events if e[1] == 5] == ["chunk", "failed"]
    assert not table.cancel(5)


def test_abort_on_prefill_reaches_decode(fake) -> None:
    sink, table, sender, done, _ = fake
    table.reserve(6)
    sender.submit(6, 0, (0, 1), (0, 2), kv(1, 2, 1.0), False)
    assert sender.abort(6, "prefill OOM")
    assert sink.events[-1] == ("failed", 6, "aborted by prefill")
    assert done[-1][:2] == (6, False) and "prefill OOM" in str(done[-1][2])
    assert not sender.abort(6)


def test_sink_error_fails_the_transfer_only(fake) -> None:
    sink, table, sender, done, _ = fake
    assert not done

    def boom(*a: Any) -> None:
        raise RuntimeError("scatter out of range")

    sink.on_chunk = boom
    table.reserve(7)
    sender.submit(7, 0, (0, 1), (0, 2), kv(1, 2, 1.0), True)
    assert sink.events[-1][0:2] == ("failed", 7) and "scatter out of range" in sink.events[-1][2]
