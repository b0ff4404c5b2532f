"""KV transport over real gloo groups on loopback: prefill in a spawned process, decode in-process.

Covers ordering, seq and transfer_id checks, byte equality, aux, splitting, draining of unknown
transfers, a prefill killed between a header and its payload (decode fails the transfer, tears
the pair down, and a fresh prefill process pairs again), and -- in-process, with threads -- payload
stalls, seq gaps, aborts, cancels, reservation timeouts and the sender's re-pairing.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from typing import Any

import pytest
import torch

from common.transport.base import KVPoll, PairEndpoint, TransferError, TransportConfig
from common.transport.pair import PREFILL_RANK, open_pair
from common.transport.receiver import PairAcceptor, ReservationTable
from common.transport.sender import KVSender
from common.transport.wire import ChunkHeader

CFG = TransportConfig(op_timeout_s=3.0, peer_timeout_s=6.0, heartbeat_s=0.3, transfer_timeout_s=8.0,
                      reserve_grace_s=0.5, pair_timeout_s=15.0, max_chunk_bytes=8192, bind_host="127.0.0.1")
HEADS, DIM = 2, 16  # one layer-token of K and V = 2 * 2 * 16 * 2 B = 128 B
BIG = (1 << 64) - 3  # a transfer id above int64: the uint64 bit pattern must survive


def kv_for(tid: int, layers: tuple[int, int], tokens: tuple[int, int]) -> torch.Tensor:
    """Deterministic random KV slice [l1-l0, 2, t1-t0, HEADS, DIM] bf16, identical in every process."""
    (l0, l1), (t0, t1) = layers, tokens
    full = torch.randn(8, 2, 64, HEADS, DIM, generator=torch.Generator().manual_seed(tid % 1000003))
    return full[l0:l1, :, t0:t1].to(torch.bfloat16).contiguous()


# Each plan: tid -> list of (layers, tokens, is_last, aux)
PLANS: dict[int, list[tuple[tuple[int, int], tuple[int, int], bool, bytes | None]]] = {
    11: [((0, 2), (0, 12), False, None), ((2, 4), (0, 12), False, None), ((4, 5), (0, 12), True, None)],
    666: [((0, 5), (0, 8), False, None), ((0, 5), (8, 16), True, b"never delivered")],  # not reserved
    22: [((0, 5), (0, 5), False, None), ((0, 5), (5, 9), False, None), ((5, 5), (9, 9), True, b"aux-of-22")],
    BIG: [((0, 5), (0, 40), True, b"\x00\x01last")],  # 25.6 KB > max_chunk_bytes: split into wire chunks
}


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.cv = threading.Condition()

    def _add(self, ev: tuple) -> None:
        with self.cv:
            self.events.append(ev)
            self.cv.notify_all()

    def on_chunk(self, tid: int, seq: int, layers: tuple[int, int], tokens: tuple[int, int],
                 heads: tuple[int, int], payload: torch.Tensor):
        self._add(("chunk", tid, seq, layers, tokens, payload.clone()))

    def on_last(self, tid: int, aux: bytes) -> None:
        self._add(("last", tid, aux))

    def on_failed(self, tid: int, reason: str) -> None:
        self._add(("failed", tid, reason))

    def wait_terminal(self, tids: set[int], timeout: float) -> None:
        with self.cv:
            ok = self.cv.wait_for(lambda: tids <= {e[1] for e in self.events if e[0] in ("last", "failed")}, timeout)
        assert ok, f"no terminal event for {tids - {e[1] for e in self.events if e[0] != 'chunk'}}: {self.events}"

    def of(self, tid: int) -> list[tuple]:
        return [e for e in self.events if e[1] == tid]


def assembled(events: list[tuple], n_layers: int, n_tokens: int) -> torch.Tensor:
    out = torch.zeros(n_layers, 2, n_tokens, HEADS, DIM, dtype=torch.bfloat16)
    for e in events:
        if e[0] == "chunk":
            (l0, l1), (t0, t1) = e[3], e[4]
            out[l0:l1, :, t0:t1] = e[5]
    return out


# ---------------------------------------------------------------------------- spawned prefill
def _prefill_child(requests: Any, replies: Any, results: Any, tids: list[int], kill_on_payload: bool) -> None:
    if kill_on_payload:  # die between the header and the payload of the second chunk
        from common.transport import pair as pair_mod

        original = pair_mod.GlooBulk.send
        calls = []

        def send(self: Any, data: torch.Tensor, deadline: float) -> None:
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            original(self, data, deadline)

        pair_mod.GlooBulk.send = send

    def pair_fn() -> PairEndpoint:
        requests.put(("pair", "prefill-0"))
        return replies.get(timeout=20)

    done = threading.Event()
    outcome: dict[int, bool] = {}

    def on_done(tid: int, ok: bool, err: Any) -> None:
        outcome[tid] = ok
        if len(outcome) == len(tids):
            done.set()

    sender = KVSender(pair_fn, on_done, CFG)
    for tid in tids:
        for seq, (layers, tokens, last, aux) in enumerate(PLANS[tid]):
            kv = kv_for(tid, layers, tokens) if layers[1] > layers[0] and tokens[1] > tokens[0] else None
            sender.submit(tid, seq, layers, tokens, kv, last, aux)
    done.wait(30)
    results.put(outcome)
    sender.close()


class Decode:
    """The decode worker's transport in this (test) process, plus a stand-in for the Pair RPC."""

    def __init__(self) -> None:
        self.sink = RecordingSink()
        self.stats: list[Any] = []
        self.table = ReservationTable(self.sink, CFG.transfer_timeout_s, on_stats=self.stats.append)
        self.acceptor = PairAcceptor(self.table, CFG, advertise_host="127.0.0.1")
        ctx = mp.get_context("spawn")
        self.ctx, self.requests, self.replies, self.results = ctx, ctx.Queue(), ctx.Queue(), ctx.Queue()
        self._stop = threading.Event()
        self._server = threading.Thread(target=self._serve_pairs, daemon=True)
        self._server.start()

    def _serve_pairs(self) -> None:
        while not self._stop.is_set():
            try:
                _, peer = self.requests.get(timeout=0.1)
            except queue.Empty:
                continue
            self.replies.put(self.acceptor.accept(peer, "gloo"))

    def spawn(self, tids: list[int], kill_on_payload: bool = False) -> Any:
        p = self.ctx.Process(target=_prefill_child, args=(self.requests, self.replies, self.results, tids,
                                                           kill_on_payload))
        p.start()
        return p

    def close(self) -> None:
        self._stop.set()
        self.acceptor.close(timeout_s=5)
        self.table.close()


@pytest.fixture
def decode():
    d = Decode()
    yield d
    d.close()


def test_three_transfers_and_a_dropped_unknown_one_between_processes(decode: Decode) -> None:
    for tid in (11, 22, BIG):
        decode.table.reserve(tid)
    child = decode.spawn([11, 666, 22, BIG])
    decode.sink.wait_terminal({11, 22, BIG}, timeout=40)
    prefill_outcome = decode.results.get(timeout=20)
    child.join(20)

    assert prefill_outcome == {11: True, 666: True, 22: True, BIG: True}  # prefill cannot see decode's drop
    assert decode.sink.of(666) == []  # unknown id: drained, never reached the sink
    assert not [e for e in decode.sink.events if e[0] == "failed"]
    for tid, n_layers, n_tokens in ((11, 5, 12), (22, 5, 9), (BIG, 5, 40)):
        evs = decode.sink.of(tid)
        chunks = [e for e in evs if e[0] == "chunk"]
        assert [e[2] for e in chunks] == list(range(len(chunks))), "seq must be 0, 1, 2, ... in order"
        assert evs[-1][0] == "last" and all(e[0] == "chunk" for e in evs[:-1])
        expect = kv_for(tid, (0, n_layers), (0, n_tokens))
        assert torch.equal(assembled(evs, n_layers, n_tokens).view(torch.int16), expect.view(torch.int16))
    assert [e[3] for e in decode.sink.of(11) if e[0] == "chunk"] == [(0, 2), (2, 4), (4, 5)]
    assert decode.sink.of(22)[-1] == ("last", 22, b"aux-of-22")
    big_chunks = [e for e in decode.sink.of(BIG) if e[0] == "chunk"]
    assert len(big_chunks) == 5 and all(e[3][1] - e[3][0] == 1 for e in big_chunks)  # split per layer
    assert decode.sink.of(BIG)[-1] == ("last", BIG, b"\x00\x01last")
    by_tid = {s.transfer_id: s for s in decode.stats}
    assert by_tid[11].ok and by_tid[11].bytes == 5 * 12 * 128 and by_tid[BIG].chunks == 5
    assert len(decode.table) == 0


def test_prefill_killed_between_header_and_payload_then_a_new_pair_works(decode: Decode) -> None:
    decode.table.reserve(11)
    child = decode.spawn([11], kill_on_payload=True)
    deadline = time.monotonic() + 20
    while (receiver := decode.acceptor.receiver("prefill-0")) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert receiver is not None
    decode.sink.wait_terminal({11}, timeout=30)
    child.join(10)
    assert child.exitcode == -signal.SIGKILL
    evs = decode.sink.of(11)
    assert [e[0] for e in evs] == ["chunk", "failed"]  # chunk 0 delivered, chunk 1 lost with the pair
    assert "pair" in evs[-1][2]
    assert receiver.closed.wait(5) and not receiver.alive  # torn down, thread ended
    assert decode.acceptor.receiver("prefill-0") is None and len(decode.table) == 0

    decode.table.reserve(22)
    child = decode.spawn([22])
    decode.sink.wait_terminal({22}, timeout=40)
    assert decode.results.get(timeout=20) == {22: True}
    child.join(20)
    assert decode.sink.of(22)[-1] == ("last", 22, b"aux-of-22")
    assert torch.equal(assembled(decode.sink.of(22), 5, 9).view(torch.int16),
                       kv_for(22, (0, 5), (0, 9)).view(torch.int16))


# ---------------------------------------------------------------------------- in-process (threads)
class Local:
    """Decode side plus an in-process KVSender whose Pair RPC is a direct call."""

    def __init__(self, cfg: TransportConfig = CFG) -> None:
        self.sink = RecordingSink()
        self.table = ReservationTable(self.sink, cfg.transfer_timeout_s)
        self.acceptor = PairAcceptor(self.table, cfg, advertise_host="127.0.0.1")
        self.pairings = 0
        self.done: dict[int, tuple[bool, Any]] = {}
        self.done_cv = threading.Condition()
        self.sender = KVSender(self._pair, self._on_done, cfg)

    def _pair(self) -> PairEndpoint:
        self.pairings += 1
        return self.acceptor.accept("p", "gloo")

    def _on_done(self, tid: int, ok: bool, err: Any) -> None:
        with self.done_cv:
            self.done[tid] = (ok, err)
            self.done_cv.notify_all()

    def wait_done(self, tid: int, timeout: float = 10) -> tuple[bool, Any]:
        with self.done_cv:
            assert self.done_cv.wait_for(lambda: tid in self.done, timeout), f"no on_done for {tid}"
            return self.done[tid]

    def send(self, tid: int, plan_tid: int = 22) -> None:
        for seq, (layers, tokens, last, aux) in enumerate(PLANS[plan_tid]):
            kv = kv_for(plan_tid, layers, tokens) if layers[1] > layers[0] and tokens[1] > tokens[0] else None
            self.sender.submit(tid, seq, layers, tokens, kv, last, aux)

    def close(self) -> None:
        self.sender.close(5)
        self.acceptor.close(5)
        self.table.close()


@pytest.fixture
def local():
    x = Local()
    yield x
    x.close()


def _raw_prefill(acceptor: PairAcceptor, cfg: TransportConfig = CFG) -> Any:
    """A hand-driven prefill side (rank 0) for protocol faults the KVSender never produces."""
    ep = acceptor.accept("raw", "gloo")
    return open_pair(ep, PREFILL_RANK, cfg, None)


def test_payload_stall_tears_the_pair_down_and_fails_every_transfer_on_it(local: Local) -> None:
    local.table.reserve(4)
    local.table.reserve(5)
    local.table.reserve(6)  # reserved but never started on this pair: unaffected
    pair = _raw_prefill(local.acceptor)
    receiver = local.acceptor.receiver("raw")
    kv = kv_for(4, (0, 1), (0, 4))
    pair.send_header(ChunkHeader(4, 0, (0, 1), (0, 4), False, 0, torch.bfloat16, HEADS, DIM), time.monotonic() + 5)
    pair.bulk.send(kv.view(-1).view(torch.uint8), time.monotonic() + 5)
    t0 = time.monotonic()
    pair.send_header(ChunkHeader(5, 0, (0, 1), (0, 4), False, 0, torch.bfloat16, HEADS, DIM), time.monotonic() + 5)
    # ... and never the payload of transfer 5
    local.sink.wait_terminal({4, 5}, timeout=CFG.op_timeout_s + 5)
    assert [e[0] for e in local.sink.of(4)] == ["chunk", "failed"]
    assert local.sink.of(5)[-1][0] == "failed" and "payload receive" in local.sink.of(5)[-1][2]
    assert receiver.closed.wait(5) and not receiver.alive
    assert CFG.op_timeout_s - 0.5 < time.monotonic() - t0 < CFG.op_timeout_s + 3
    assert local.table.state(6) == KVPoll.WaitingForInput and local.sink.of(6) == []
    pair.close()


def test_seq_gap_fails_that_transfer_only_and_the_pair_stays_usable(local: Local) -> None:
    local.table.reserve(5)
    local.table.reserve(6)
    pair = _raw_prefill(local.acceptor)
    receiver = local.acceptor.receiver("raw")
    dl = time.monotonic() + 5
    kv = kv_for(5, (0, 1), (0, 4))
    flat = kv.view(-1).view(torch.uint8)
    pair.send_header(ChunkHeader(5, 1, (0, 1), (0, 4), False, 0, torch.bfloat16, HEADS, DIM), dl)  # seq 1 first
    pair.bulk.send(flat, dl)
    pair.send_header(ChunkHeader(6, 0, (0, 1), (0, 4), True, 3, torch.bfloat16, HEADS, DIM), dl)
    pair.bulk.send(flat, dl)
    pair.send_aux(b"abc", dl)
    local.sink.wait_terminal({5, 6}, timeout=10)
    assert local.sink.of(5) == [("failed", 5, "chunk seq 1 arrived, expected 0")]
    assert [e[0] for e in local.sink.of(6)] == ["chunk", "last"] and local.sink.of(6)[-1][2] == b"abc"
    assert torch.equal(local.sink.of(6)[0][5].view(torch.int16), kv.view(torch.int16))
    assert receiver.alive
    pair.close()


def test_reserved_transfer_without_chunks_times_out() -> None:
    sink = RecordingSink()
    table = ReservationTable(sink, transfer_timeout_s=0.3, tick_s=0.02)
    try:
        table.reserve(9)
        t0 = time.monotonic()
        sink.wait_terminal({9}, timeout=3)
        assert 0.25 < time.monotonic() - t0 < 2
        assert sink.of(9)[0][0] == "failed" and "timeout" in sink.of(9)[0][2]
        assert table.state(9) is None and not table.cancel(9)
    finally:
        table.close()


def test_abort_on_prefill_fails_both_sides_and_next_transfer_works(local: Local) -> None:
    local.table.reserve(7)
    local.table.reserve(8)
    local.sender.submit(7, 0, (0, 5), (0, 5), kv_for(22, (0, 5), (0, 5)), False)
    local.sink.wait_terminal(set(), timeout=1)
    deadline = time.monotonic() + 10
    while not local.sink.of(7) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert local.sender.abort(7, "client went away")
    ok, err = local.wait_done(7)
    assert not ok and "client went away" in str(err)
    local.sink.wait_terminal({7}, timeout=10)
    assert local.sink.of(7)[-1] == ("failed", 7, "aborted by prefill")
    local.sender.submit(7, 1, (0, 5), (5, 9), kv_for(22, (0, 5), (5, 9)), True)  # late chunk: dropped quietly
    local.send(8)
    assert local.wait_done(8) == (True, None)
    local.sink.wait_terminal({8}, timeout=10)
    assert local.sink.of(8)[-1] == ("last", 8, b"aux-of-22")
    assert local.sender.poll(7) == KVPoll.Failed and local.sender.poll(8) == KVPoll.Success


def test_cancel_on_decode_drops_remaining_chunks_exactly_once(local: Local) -> None:
    local.table.reserve(3)
    local.table.reserve(4)
    assert local.table.cancel(3, "client cancelled")
    assert not local.table.cancel(3)
    local.send(3)  # every chunk is drained and dropped
    local.send(4)
    local.sink.wait_terminal({4}, timeout=10)
    assert local.sink.of(3) == [("failed", 3, "client cancelled")]
    assert local.sink.of(4)[-1] == ("last", 4, b"aux-of-22")


def test_sender_repairs_after_decode_drops_the_pair(local: Local) -> None:
    local.table.reserve(1)
    local.send(1)
    assert local.wait_done(1) == (True, None)
    assert local.pairings == 1 and local.sender.paired
    old = local.acceptor.receiver("p")
    assert old.close(timeout_s=5)  # decode gives the pair up; prefill notices on its next heartbeat
    deadline = time.monotonic() + 5
    while local.sender.paired and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not local.sender.paired
    local.table.reserve(2)
    local.send(2)
    assert local.wait_done(2) == (True, None)
    assert local.pairings == 2
    local.sink.wait_terminal({1, 2}, timeout=10)
    assert local.sink.of(2)[-1] == ("last", 2, b"aux-of-22")


def test_pairing_failure_fails_only_that_transfer() -> None:
    sink = RecordingSink()
    table = ReservationTable(sink, CFG.transfer_timeout_s)
    results: dict[int, tuple[bool, Any]] = {}
    got = threading.Event()

    def refuse() -> PairEndpoint:
        raise ConnectionError("decode refused: page_size differs: prefill 16, decode 32")

    def on_done(tid: int, ok: bool, err: Any) -> None:
        results[tid] = (ok, err)
        got.set()

    sender = KVSender(refuse, on_done, CFG)
    try:
        sender.submit(1, 0, (0, 1), (0, 2), kv_for(1, (0, 1), (0, 2)), True)
        assert got.wait(5)
        ok, err = results[1]
        assert not ok and "page_size differs" in str(err)
        with pytest.raises(ValueError, match="seq"):
            sender.submit(2, 1, (0, 1), (0, 2), kv_for(1, (0, 1), (0, 2)), True)
        with pytest.raises(ValueError, match="kv shape"):
            sender.submit(3, 0, (0, 2), (0, 2), kv_for(1, (0, 1), (0, 2)), True)
        with pytest.raises(ValueError, match="aux"):
            sender.submit(4, 0, (0, 1), (0, 2), kv_for(1, (0, 1), (0, 2)), False, aux=b"x")
    finally:
        sender.close(5)
        table.close()


def test_kv_arriving_just_before_its_reservation_waits_for_it(local: Local) -> None:
    local.send(31)  # prefill is faster than decode's Generate: the pair holds the chunk briefly
    time.sleep(0.1)
    local.table.reserve(31)
    local.sink.wait_terminal({31}, timeout=10)
    assert [e[0] for e in local.sink.of(31)] == ["chunk", "chunk", "last"]

    local.send(32)  # never reserved within reserve_grace_s: dropped, and a late reserve is refused
    assert local.wait_done(32) == (True, None)
    time.sleep(0.1)
    with pytest.raises(TransferError, match="transfer 32 already ended: its KV arrived and found no reservation"):
        local.table.reserve(32)
    assert local.sink.of(32) == []
