"""In-process fake transport for scheduler and worker unit tests (CPU, no groups, no threads).

`LoopbackSender` has KVSender's surface (submit / abort / poll / close, on_done and on_stats
callbacks) and delivers each chunk synchronously, in the submitting thread, into a real
`ReservationTable` -- so the decode side sees exactly the production semantics: reservation
checks, seq checks, drops of unknown transfers, exactly one on_last / on_failed, timeouts, cancel.
`break_pair(reason)` injects the failure of a real pair: every transfer that moved data fails on
both sides; later transfers go through (as after a re-pair).
"""

from __future__ import annotations

import time

import torch

from common.transport.base import DoneHook, KVPoll, PairBroken, StatsHook, TransferError
from common.transport.receiver import ReservationTable, Verdict
from common.transport.sender import Chunk, SendBook
from common.transport.wire import ChunkHeader


class LoopbackSender:
    def __init__(self, table: ReservationTable, on_done: DoneHook, *, on_stats: StatsHook | None = None,
                 max_aux_bytes: int = 16 << 20) -> None:
        self._table = table
        self._book = SendBook(on_done, on_stats, max_aux_bytes)
        self._closed = False
        self.paired = True

    def submit(self, transfer_id: int, seq: int, layers: tuple[int, int], tokens: tuple[int, int],
               kv_tensor: torch.Tensor | None, is_last: bool, aux: bytes | None = None,
               ready_event: object = None) -> None:
        if self._closed:
            raise TransferError("LoopbackSender is closed")
        c = Chunk(transfer_id, seq, tuple(layers), tuple(tokens), kv_tensor, is_last, aux, ready_event)
        if not self._book.admit(c):
            return
        tx = self._book.tx[transfer_id]
        if tx.abort_reason is not None:
            self._abort_now(transfer_id, tx.abort_reason)
            return
        if tx.t_start is None:
            tx.t_start = time.monotonic()
        kv = c.kv
        payload = None if kv is None else kv.detach().to("cpu").clone()  # the receiver's staging copy
        hdr = ChunkHeader(transfer_id, tx.wire_seq, c.layers, c.tokens, is_last, len(aux or b""),
                          kv.dtype if kv is not None else torch.uint8,
                          kv.shape[3] if kv is not None else 0, kv.shape[4] if kv is not None else 0)
        verdict = self._table.begin(hdr, self)
        if verdict is Verdict.ACCEPT:
            error = None
            try:
                if payload is not None and payload.numel():
                    self._table.sink.on_chunk(transfer_id, hdr.seq, hdr.layers, hdr.tokens, hdr.heads, payload)
            except Exception as e:  # noqa: BLE001 - same as KVReceiver: the transfer fails, not the pair
                error = f"sink failed on chunk {hdr.seq}: {e!r}"
            self._table.end(hdr, aux=aux or b"", error=error)
        tx.wire_seq += 1
        tx.chunks += 1
        tx.bytes += hdr.payload_bytes
        tx.state = KVPoll.Transferring
        if is_last:
            self._book.finish(transfer_id, None)

    def abort(self, transfer_id: int, reason: str = "aborted by prefill") -> bool:
        if not self._book.request_abort(transfer_id, reason):
            return False
        self._abort_now(transfer_id, reason)
        return True

    def poll(self, transfer_id: int) -> KVPoll | None:
        return self._book.poll(transfer_id)

    def break_pair(self, reason: str = "injected pair failure") -> list[int]:
        """Fail every transfer that moved data, on both sides (what a broken real pair does)."""
        victims = [t for t, tx in list(self._book.tx.items()) if tx.state == KVPoll.Transferring]
        for t in victims:
            self._book.finish(t, PairBroken(f"loopback pair broken: {reason}"))
        self._table.fail_owned(self, f"loopback pair broken: {reason}")
        return victims

    def close(self, timeout_s: float | None = None) -> None:
        self._closed = True
        for t in list(self._book.tx):
            self._book.finish(t, TransferError("KV sender closed"))
        self._table.fail_owned(self, "loopback sender closed")

    def _abort_now(self, transfer_id: int, reason: str) -> None:
        self._book.finish(transfer_id, TransferError(reason))
        self._table.fail(transfer_id, "aborted by prefill")

