"""Prefill side of a pair: KVSender, one per (prefill rank, decode rank), with its own thread.

Threading: `submit`/`abort`/`poll`/`close` may be called from any thread (the prefill engine);
everything that touches the pair (pairing, groups, sends, heartbeats, teardown) runs on the
sender thread, in submission order, and so do the `on_done` / `on_stats` callbacks.

Per chunk the thread waits (bounded) for the chunk's CUDA ready event on the CPU -- the engine
keeps computing the next layers meanwhile -- splits it into wire chunks of at most the bulk
channel's max_chunk_bytes (whole layers first), and sends header, payload and (last chunk
only) aux, each with an op_timeout_s deadline.

Failure semantics:
- any error after a header went out (timeout, peer gone, NCCL error) breaks the pair: its
  groups are aborted, every transfer that moved data on it fails with PairBroken, and the next
  chunk of another transfer re-pairs (`pair_fn()` = the caller's Pair RPC) under a new group_name;
- a transfer that has not moved data yet survives a break and goes out on the new pair;
- pairing failures fail the transfer at hand only; `abort(tid)` stops a transfer at the next
  chunk boundary and tells decode (ABORT header); chunks submitted for a failed transfer are
  dropped silently (its on_done(ok=False) was already delivered);
- when idle for heartbeat_s the thread sends a heartbeat, so decode notices a vanished prefill
  within peer_timeout_s and a vanished decode is noticed here before the next transfer.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from common.transport.base import (
    DoneHook,
    KVPoll,
    PairBroken,
    PairEndpoint,
    StatsHook,
    TransferError,
    TransferStats,
    TransportConfig,
    safe_call,
)
from common.transport.handshake import PairingError
from common.transport.pair import PREFILL_RANK, PairChannels, open_pair
from common.transport.wire import ChunkHeader, Kind, split_chunk

log = logging.getLogger(__name__)
_RECENT = 4096  # finished transfers remembered for poll() / dropped-chunk bookkeeping


@dataclass(frozen=True)
class SenderStream:
    """The prefill side of one TP stream (handshake.transfer_plan): the sending rank, its worker's TP
    size, and the first global kv head of the chunks it is given."""

    src_rank: int = 0
    src_tp: int = 1
    head_lo: int = 0


@dataclass
class Chunk:
    transfer_id: int
    seq: int
    layers: tuple[int, int]
    tokens: tuple[int, int]
    kv: torch.Tensor | None  # [l1-l0, 2, t1-t0, kv_heads, head_dim] or None (aux-only / empty)
    is_last: bool
    aux: bytes | None
    ready: Any = None  # torch.cuda.Event | None


@dataclass
class _Tx:
    next_seq: int = 0  # caller seq expected next
    wire_seq: int = 0
    state: KVPoll = KVPoll.WaitingForInput
    ended: bool = False  # caller submitted is_last
    abort_reason: str | None = None
    gen: int = -1  # pair generation the transfer moved data on
    bytes: int = 0
    chunks: int = 0
    t_start: float | None = None


class SendBook:
    """Caller-facing bookkeeping shared by KVSender and the loopback fake: argument checks, seq
    order, the one on_done per transfer, dropped chunks of failed transfers, poll()."""

    def __init__(self, on_done: DoneHook, on_stats: StatsHook | None, max_aux_bytes: int) -> None:
        self._on_done, self._on_stats, self._max_aux = on_done, on_stats, max_aux_bytes
        self.lock = threading.Lock()
        self.tx: dict[int, _Tx] = {}
        self._dead: OrderedDict[int, None] = OrderedDict()  # failed, caller may still submit chunks
        self._recent: OrderedDict[int, KVPoll] = OrderedDict()

    def admit(self, c: Chunk) -> bool:
        """Validate a submit; False = drop silently (transfer already failed)."""
        if not 0 <= c.transfer_id < 1 << 64:
            raise ValueError(f"transfer_id {c.transfer_id} is not a uint64")
        (l0, l1), (t0, t1) = c.layers, c.tokens
        if not (0 <= l0 <= l1 and 0 <= t0 <= t1):
            raise ValueError(f"bad ranges layers={c.layers} tokens={c.tokens}")
        if c.kv is None:
            if l1 > l0 and t1 > t0:
                raise ValueError(f"chunk layers={c.layers} tokens={c.tokens} needs a kv tensor")
        elif c.kv.dim() != 5 or tuple(c.kv.shape[:3]) != (l1 - l0, 2, t1 - t0):
            raise ValueError(f"kv shape {tuple(c.kv.shape)} != [{l1 - l0}, 2, {t1 - t0}, kv_heads, head_dim]")
        if c.aux is not None and (not c.is_last or len(c.aux) > self._max_aux):
            raise ValueError(f"aux ({len(c.aux)} B) only on the last chunk and at most {self._max_aux} B")
        with self.lock:
            if c.transfer_id in self._dead:
                if c.is_last:
                    del self._dead[c.transfer_id]
                return False
            tx = self.tx.get(c.transfer_id)
            if tx is None:
                if c.transfer_id in self._recent:
                    raise ValueError(f"transfer {c.transfer_id} already finished")
                tx = self.tx[c.transfer_id] = _Tx()
            if tx.ended or c.seq != tx.next_seq:
                raise ValueError(f"transfer {c.transfer_id}: seq {c.seq} out of order (expected {tx.next_seq}"
                                 f"{', after its last chunk' if tx.ended else ''})")
            tx.next_seq += 1
            tx.ended = c.is_last
            return True

    def request_abort(self, tid: int, reason: str) -> bool:
        with self.lock:
            tx = self.tx.get(tid)
            if tx is None:
                return False
            tx.abort_reason = reason
            return True

    def poll(self, tid: int) -> KVPoll | None:
        with self.lock:
            tx = self.tx.get(tid)
            return tx.state if tx is not None else self._recent.get(tid)

    def finish(self, tid: int, error: TransferError | None) -> None:
        """Deliver the transfer's one on_done (and stats); no-op if already delivered."""
        with self.lock:
            tx = self.tx.pop(tid, None)
            if tx is None:
                return
            state = KVPoll.Success if error is None else KVPoll.Failed
            self._recent[tid] = state
            if len(self._recent) > _RECENT:
                self._recent.popitem(last=False)
            if error is not None and not tx.ended:
                self._dead[tid] = None
                if len(self._dead) > _RECENT:
                    self._dead.popitem(last=False)
        secs = time.monotonic() - tx.t_start if tx.t_start is not None else 0.0
        safe_call(self._on_stats, TransferStats(tid, error is None, tx.bytes, secs, tx.chunks))
        safe_call(self._on_done, tid, error is None, error)



class KVSender:
    def __init__(self, pair_fn: Callable[[], PairEndpoint], on_done: DoneHook,
                 config: TransportConfig | None = None, *, device: torch.device | None = None,
                 on_stats: StatsHook | None = None, name: str = "kv-sender", stream: SenderStream | None = None) -> None:
        """pair_fn: runs on the sender thread whenever a pair is needed; calls the decode worker's
        Pair RPC (bounded) and returns its PairEndpoint. device: this rank's GPU (None on CPU).
        stream: which prefill rank this is and which global kv heads its chunks hold (TP; default:
        rank 0 of 1, heads from 0)."""
        self._pair_fn, self._cfg, self._device = pair_fn, config or TransportConfig(), device
        self._stream = stream or SenderStream()
        self._book = SendBook(on_done, on_stats, self._cfg.max_aux_bytes)
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pair: PairChannels | None = None
        self._gen = 0
        self._last_send = time.monotonic()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side
    def submit(self, transfer_id: int, seq: int, layers: tuple[int, int], tokens: tuple[int, int],
               kv_tensor: torch.Tensor | None, is_last: bool, aux: bytes | None = None,
               ready_event: Any = None) -> None:
        """Queue one chunk (seq from 0 per transfer). The sender keeps a reference to kv_tensor
        until it is sent; on CUDA without ready_event an event is recorded on the current stream."""
        if self._closed:
            raise TransferError("KVSender is closed")
        c = Chunk(transfer_id, seq, tuple(layers), tuple(tokens), kv_tensor, is_last, aux, ready_event)
        if not self._book.admit(c):
            return
        if kv_tensor is not None and kv_tensor.is_cuda and ready_event is None:
            c.ready = torch.cuda.Event()
            c.ready.record()
        self._q.put((self._handle_chunk, c))

    def abort(self, transfer_id: int, reason: str = "aborted by prefill") -> bool:
        """Stop the transfer at the next chunk boundary; on_done(ok=False) follows. False if unknown."""
        if self._book.request_abort(transfer_id, reason):
            self._q.put((self._handle_abort, transfer_id))
            return True
        return False

    def poll(self, transfer_id: int) -> KVPoll | None:
        state = self._book.poll(transfer_id)
        if state == KVPoll.WaitingForInput and self._pair is None:
            return KVPoll.Bootstrapping
        return state

    @property
    def paired(self) -> bool:
        return self._pair is not None

    def close(self, timeout_s: float | None = None) -> None:
        """Fail what is pending, say BYE to decode, destroy the groups, stop the thread."""
        if not self._closed:
            self._closed = True
            self._q.put((None, None))
        self._thread.join(timeout_s if timeout_s is not None else self._cfg.op_timeout_s + self._cfg.pair_timeout_s)

    # ------------------------------------------------------------------ sender thread
    def _run(self) -> None:
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        while True:
            try:
                handler, arg = self._q.get(timeout=self._cfg.heartbeat_s)
            except queue.Empty:
                handler, arg = self._idle, None
            if handler is None:
                break
            try:
                handler(arg)
            except Exception as e:  # a bug must not silently kill the sender thread
                log.exception("KV sender: unexpected error")
                self._break(e, getattr(arg, "transfer_id", None))
            if self._pair is not None and time.monotonic() - self._last_send >= self._cfg.heartbeat_s:
                self._send_control(Kind.HEARTBEAT, 0)
        for tid in list(self._book.tx):
            self._book.finish(tid, TransferError("KV sender closed"))
        if self._pair is not None:
            self._send_control(Kind.BYE, 0)
        self._drop_pair()

    def _idle(self, _: None) -> None:
        pass  # nothing queued for heartbeat_s: the check after every item sends the heartbeat

    def _handle_abort(self, tid: int) -> None:
        tx = self._book.tx.get(tid)
        if tx is not None and tx.abort_reason is not None:
            self._abort_now(tid, tx.abort_reason)

    def _abort_now(self, tid: int, reason: str) -> None:
        self._book.finish(tid, TransferError(reason))
        if self._pair is not None:
            self._send_control(Kind.ABORT, tid)

    def _handle_chunk(self, c: Chunk) -> None:
        tx = self._book.tx.get(c.transfer_id)
        if tx is None:
            return  # failed or aborted meanwhile
        if tx.abort_reason is not None:
            self._abort_now(c.transfer_id, tx.abort_reason)
            return
        if self._pair is None:
            try:
                self._connect()
            except Exception as e:  # noqa: BLE001 - pairing errors fail this transfer only
                log.warning("KV pairing failed: %s", e)
                # a refused pair (incompatible, or no cluster secret) is the caller's to see as such
                self._book.finish(c.transfer_id, e if isinstance(e, PairingError)
                                  else TransferError(f"pairing with decode failed: {e}"))
                return
        try:
            self._send_chunk(tx, c)
        except PairBroken as e:
            self._break(e, c.transfer_id)
            return
        except Exception as e:  # noqa: BLE001 - raised before any header of this chunk went out
            self._book.finish(c.transfer_id, e if isinstance(e, TransferError) else TransferError(repr(e)))
            if tx.chunks and self._pair is not None:
                self._send_control(Kind.ABORT, c.transfer_id)
            return
        if c.is_last:
            self._book.finish(c.transfer_id, None)

    def _send_chunk(self, tx: _Tx, c: Chunk) -> None:
        pair = self._pair
        assert pair is not None
        deadline = time.monotonic() + self._cfg.op_timeout_s
        if tx.t_start is None:
            tx.t_start = time.monotonic()
        if c.ready is not None:
            _wait_event(c.ready, deadline)
        kv = c.kv
        if kv is None:
            pieces = [(c.layers, c.tokens)]
        else:
            per_lt = 2 * kv.shape[3] * kv.shape[4] * kv.element_size()
            pieces = split_chunk(c.layers, c.tokens, per_lt, pair.bulk.max_chunk_bytes)
        for i, (lr, tr) in enumerate(pieces):
            last = i == len(pieces) - 1
            deadline = time.monotonic() + self._cfg.op_timeout_s
            if kv is None:
                flat = torch.empty(0, dtype=torch.uint8)
                dtype, heads, dim = torch.uint8, 0, 0
            else:
                sub = kv[lr[0] - c.layers[0]:lr[1] - c.layers[0], :, tr[0] - c.tokens[0]:tr[1] - c.tokens[0]]
                flat = sub.contiguous().view(-1).view(torch.uint8)
                dtype, heads, dim = kv.dtype, kv.shape[3], kv.shape[4]
            off, advance = pair.bulk.stage(flat, deadline) if flat.numel() else (0, 0)
            aux = c.aux if (last and c.aux) else b""
            st = self._stream
            hdr = ChunkHeader(c.transfer_id, tx.wire_seq, lr, tr, c.is_last and last, len(aux), dtype, heads, dim,
                              Kind.DATA, off, advance, st.head_lo, st.src_rank, st.src_tp)
            try:
                pair.send_header(hdr, deadline)
                if flat.numel():
                    pair.bulk.send(flat, deadline)
                if aux:
                    pair.send_aux(aux, deadline)
            except PairBroken:
                raise
            except Exception as e:
                raise PairBroken(f"chunk {tx.wire_seq} of transfer {c.transfer_id}: {e!r}") from e
            self._last_send = time.monotonic()
            tx.wire_seq += 1
            tx.chunks += 1
            tx.bytes += flat.numel()
            tx.gen, tx.state = self._gen, KVPoll.Transferring

    def _send_control(self, kind: Kind, tid: int) -> None:
        assert self._pair is not None
        try:
            self._pair.send_header(ChunkHeader.control(kind, tid), time.monotonic() + self._cfg.op_timeout_s)
            self._last_send = time.monotonic()
        except PairBroken as e:
            self._break(e, None)

    def _connect(self) -> None:
        self._gen += 1
        endpoint = self._pair_fn()
        self._pair = open_pair(endpoint, PREFILL_RANK, self._cfg, self._device)
        if self._pair.bulk.stream is not None:
            torch.cuda.set_stream(self._pair.bulk.stream)  # this thread's copies go on the bulk stream
        self._last_send = time.monotonic()
        log.info("KV pair %s up (%s)", endpoint.group_name, endpoint.bulk_backend)

    def _break(self, err: Exception, current: int | None) -> None:
        name = self._pair.endpoint.group_name if self._pair is not None else "?"
        log.warning("KV pair %s broken: %s", name, err)
        self._drop_pair()
        victims = [tid for tid, tx in list(self._book.tx.items())
                   if tid == current or (tx.gen == self._gen and tx.state == KVPoll.Transferring)]
        for tid in victims:
            self._book.finish(tid, PairBroken(f"pair {name} broken: {err}"))

    def _drop_pair(self) -> None:
        pair, self._pair = self._pair, None
        if pair is not None:
            pair.close()


def _wait_event(ev: Any, deadline: float) -> None:
    """CPU-side bounded wait for the layer group's compute (the engine stream keeps running);
    yield-spin 2 ms, then short naps (see nccl._poll)."""
    start = time.monotonic()
    while not ev.query():
        now = time.monotonic()
        if now > deadline:
            raise TransferError("KV chunk not ready (compute event) before the deadline")
        waited = now - start
        time.sleep(0 if waited < 0.002 else 0.00005 if waited < 0.02 else 0.0005)
