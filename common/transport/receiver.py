"""Decode side: the reservation table, one KVReceiver thread per pair, and the PairAcceptor.

ReservationTable (one per decode worker, shared by its pairs) owns the sink and every terminal
callback. docs/disaggregation.md rule 1: decode reserves (`reserve(tid)`) before prefill may send.
Exactly one of on_last / on_failed reaches the sink per reserved transfer, never a call after
it, and never while a chunk of that transfer is being written (a cancel during a chunk is
delivered when the chunk ends) -- so the worker frees pages in on_last/on_failed handling only.
A watchdog thread fails reservations that see no chunk for transfer_timeout_s.
Under tensor parallelism a decode rank may receive one transfer from several prefill ranks, one
pair each (handshake.transfer_plan, from the first chunk's src_tp and this rank's `layout`): each
source keeps its own chunk order and pair, must send exactly its heads, and the transfer completes
when every source sent its last chunk (the aux record rides on prefill rank 0's).

KVReceiver thread: build the pair (rank 1), then loop: header (waited up to peer_timeout_s; the
prefill heartbeats when idle), payload into staging / the IPC ring, aux, then the sink. Chunks of
unknown or failed transfers are still read in full (so the stream stays aligned) and dropped.
Any pair failure (peer gone, timeout, bad bytes) tears the pair down and fails every transfer
that moved data on it; the prefill re-pairs through the Pair RPC (PairAcceptor.accept).
"""

from __future__ import annotations

import enum
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from common.transport.base import (
    KVPoll,
    KVSink,
    PairBroken,
    PairEndpoint,
    StatsHook,
    TransferError,
    TransferStats,
    TransportConfig,
    safe_call,
)
from common.transport.handshake import transfer_plan
from common.transport.pair import DECODE_RANK, PairChannels, host_store, open_pair
from common.transport.wire import ChunkHeader, Kind

log = logging.getLogger(__name__)
_GONE = 1 << 16  # ended transfer ids remembered (late chunks drop at once; a re-reserve is refused)


class Verdict(enum.Enum):
    ACCEPT = 1
    UNKNOWN = 2  # not reserved (never, or already finished/failed/cancelled): drain and drop
    DROP = 3  # reserved but rejected (bad seq, second pair): failed, drain and drop


@dataclass
class _Source:
    """One prefill rank's stream of a transfer."""

    heads: tuple[int, int] | None  # the global kv heads it must send (None: not checked)
    next_seq: int = 0
    owner: Any = None
    done: bool = False


@dataclass
class _Entry:
    timeout_s: float
    last: float
    sources: dict[int, _Source] | None = None  # by prefill rank; known from the first chunk
    src_tp: int = 0
    busy: int = 0  # chunks being written now
    cancel_reason: str | None = None
    aux: bytes = b""
    bytes: int = 0
    chunks: int = 0
    t_first: float | None = None


@dataclass(frozen=True)
class RankLayout:
    """This decode rank's place in its worker: the model's kv heads, the worker's TP size, the rank."""

    kv_heads: int
    tp_size: int
    rank: int


class ReservationTable:
    def __init__(self, sink: KVSink, transfer_timeout_s: float, *, tick_s: float = 0.05,
                 on_stats: StatsHook | None = None, layout: RankLayout | None = None) -> None:
        """layout None: every transfer comes whole from one prefill rank (TP 1 to TP 1)."""
        self.sink = sink
        self.layout = layout
        self._timeout, self._on_stats = transfer_timeout_s, on_stats
        self._lock = threading.Lock()
        self._reserved = threading.Condition(self._lock)
        self._entries: dict[int, _Entry] = {}
        self._gone: OrderedDict[int, str] = OrderedDict()  # recently ended transfers -> how they ended
        self._stop = threading.Event()
        self._tick = tick_s
        self._watchdog = threading.Thread(target=self._watch, name="kv-reservations", daemon=True)
        self._watchdog.start()

    # ------------------------------------------------------------------ worker side
    def reserve(self, transfer_id: int, timeout_s: float | None = None) -> None:
        """Before the transfer may start. Raises TransferError when the id is already known: still
        reserved, or ended recently (e.g. its KV arrived before this call, waited reserve_grace_s
        and was dropped) -- the request must fail rather than wait for bytes that will not come."""
        with self._lock:
            if transfer_id in self._entries:
                raise TransferError(f"transfer {transfer_id} is already reserved")
            if transfer_id in self._gone:
                raise TransferError(f"transfer {transfer_id} already ended: {self._gone[transfer_id]}")
            self._entries[transfer_id] = _Entry(timeout_s or self._timeout, time.monotonic())
            self._reserved.notify_all()

    def cancel(self, transfer_id: int, reason: str = "cancelled") -> bool:
        """Fail a reserved transfer (on_failed(tid, reason) follows, possibly after the chunk in
        progress). False when the transport no longer holds it (its terminal call already went)."""
        return self.fail(transfer_id, reason)

    def state(self, transfer_id: int) -> KVPoll | None:
        with self._lock:
            e = self._entries.get(transfer_id)
        if e is None:
            return None
        return KVPoll.Transferring if e.chunks or e.busy else KVPoll.WaitingForInput

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        self._stop.set()
        self._watchdog.join(1.0)

    # ------------------------------------------------------------------ receiver side
    def begin(self, hdr: ChunkHeader, owner: Any, grace_s: float = 0.0) -> Verdict:
        """Admit a chunk. A transfer never seen before gets grace_s to be reserved (parallel legs)."""
        tid = hdr.transfer_id
        with self._lock:
            if tid not in self._gone:
                self._reserved.wait_for(lambda: tid in self._entries, timeout=grace_s)
            e = self._entries.get(tid)
            if e is None:
                if tid not in self._gone:
                    self._bury(tid, f"its KV arrived and found no reservation within {grace_s}s; dropped")
                return Verdict.UNKNOWN
            if e.sources is None:
                e.src_tp, e.sources = hdr.src_tp, self._sources(hdr.src_tp)
            src = e.sources.get(hdr.src_rank)
            if hdr.src_tp != e.src_tp:
                reason = f"chunks arrived from prefill workers of TP {e.src_tp} and {hdr.src_tp}"
            elif src is None or src.done:
                reason = f"a chunk from prefill rank {hdr.src_rank} of {hdr.src_tp}, which sends this rank nothing more"
            elif src.owner is not None and src.owner is not owner:
                reason = "chunks arrived from two different prefill pairs"
            elif hdr.seq != src.next_seq:
                reason = f"chunk seq {hdr.seq} arrived, expected {src.next_seq}"
            elif hdr.payload_bytes and src.heads is not None and hdr.heads != src.heads:
                reason = f"prefill rank {hdr.src_rank} sent kv heads {hdr.heads}, this rank takes {src.heads} from it"
            else:
                e.busy += 1
                src.owner, src.next_seq = owner, src.next_seq + 1
                if e.t_first is None:
                    e.t_first = time.monotonic()
                return Verdict.ACCEPT
            if e.busy:  # another source's chunk is being written: it delivers the failure
                e.cancel_reason = e.cancel_reason or reason
                return Verdict.DROP
            del self._entries[hdr.transfer_id]
        self._terminal(hdr.transfer_id, e, reason, None)
        return Verdict.DROP

    def _sources(self, src_tp: int) -> dict[int, _Source]:
        """The prefill ranks that send this rank a transfer from a prefill worker of TP src_tp."""
        if self.layout is None:
            return {0: _Source(None)}
        lay = self.layout
        try:
            plan = transfer_plan(lay.kv_heads, src_tp, lay.tp_size)
        except ValueError:
            return {}  # nothing maps: the first chunk is refused (pairing refuses this pair anyway)
        return {s.src: _Source((s.head_lo, s.head_hi)) for s in plan if s.dst == lay.rank}

    def end(self, hdr: ChunkHeader, aux: bytes = b"", error: str | None = None) -> None:
        """After an ACCEPTed chunk: record it and deliver on_last / pending cancel / error."""
        with self._lock:
            e = self._entries[hdr.transfer_id]
            e.busy, e.last = e.busy - 1, time.monotonic()
            e.chunks += 1
            e.bytes += hdr.payload_bytes if error is None else 0
            if aux:
                e.aux = aux
            if error is not None:
                e.cancel_reason = e.cancel_reason or error
            if hdr.is_last and e.sources is not None:
                e.sources[hdr.src_rank].done = True
            reason = e.cancel_reason
            complete = e.sources is not None and all(s.done for s in e.sources.values())
            if e.busy or (reason is None and not complete):
                return
            del self._entries[hdr.transfer_id]
        self._terminal(hdr.transfer_id, e, reason, e.aux)

    def fail(self, transfer_id: int, reason: str) -> bool:
        with self._lock:
            e = self._entries.get(transfer_id)
            if e is None:
                return False
            if e.busy:
                e.cancel_reason = e.cancel_reason or reason
                return True
            del self._entries[transfer_id]
        self._terminal(transfer_id, e, reason, None)
        return True

    def fail_owned(self, owner: Any, reason: str) -> list[int]:
        with self._lock:
            tids = [t for t, e in self._entries.items()
                    if e.sources is not None and any(s.owner is owner for s in e.sources.values())]
        return [t for t in tids if self.fail(t, reason)]

    def sweep(self) -> list[int]:
        now = time.monotonic()
        with self._lock:
            tids = [t for t, e in self._entries.items() if not e.busy and now - e.last > e.timeout_s]
        return [t for t in tids if self.fail(t, "no KV chunk arrived within the transfer timeout")]

    def _watch(self) -> None:
        while not self._stop.wait(self._tick):
            self.sweep()

    def _bury(self, tid: int, how: str) -> None:  # under the lock
        self._gone[tid] = how
        if len(self._gone) > _GONE:
            self._gone.popitem(last=False)

    def _terminal(self, tid: int, e: _Entry, reason: str | None, aux: bytes | None) -> None:
        with self._lock:
            self._bury(tid, "completed" if reason is None else f"failed: {reason}")
        secs = time.monotonic() - e.t_first if e.t_first is not None else 0.0
        safe_call(self._on_stats, TransferStats(tid, reason is None, e.bytes, secs, e.chunks))
        if reason is None:
            safe_call(self.sink.on_last, tid, aux or b"")
        else:
            log.info("KV transfer %d failed: %s", tid, reason)
            safe_call(self.sink.on_failed, tid, reason)


class KVReceiver:
    def __init__(self, endpoint: PairEndpoint, table: ReservationTable, config: TransportConfig | None = None,
                 *, device: torch.device | None = None, ipc_ring: Any = None,
                 on_closed: Callable[[KVReceiver, str], None] | None = None) -> None:
        self.endpoint, self._table, self._cfg, self._device = endpoint, table, config or TransportConfig(), device
        self._ipc_ring, self._on_closed = ipc_ring, on_closed
        self._pair: PairChannels | None = None
        self._stop = threading.Event()
        self.closed = threading.Event()
        self.reason: str | None = None  # why the pair ended
        self._thread = threading.Thread(target=self._run, name=f"kv-recv {endpoint.group_name}", daemon=True)

    def start(self) -> KVReceiver:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout_s: float | None = None) -> bool:
        """Stop; the thread ends at the next message (<= heartbeat_s while prefill lives) or when the
        peer goes. timeout_s=0: do not wait. Returns True once the thread has ended."""
        self._stop.set()
        if timeout_s != 0 and self._thread.is_alive():
            self._thread.join(timeout_s if timeout_s is not None else self._cfg.heartbeat_s + 2.0)
        return not self._thread.is_alive()

    def _run(self) -> None:
        reason = "closed"
        try:
            if self._device is not None and self._device.type == "cuda":
                torch.cuda.set_device(self._device)
            self._pair = open_pair(self.endpoint, DECODE_RANK, self._cfg, self._device,
                                   should_stop=self._stop.is_set, ipc_ring=self._ipc_ring)
            if self._pair.bulk.stream is not None:
                torch.cuda.set_stream(self._pair.bulk.stream)  # the sink copies on the bulk stream
            while not self._stop.is_set():
                hdr = self._pair.recv_header(time.monotonic() + self._cfg.peer_timeout_s)
                if hdr.kind == Kind.DATA:
                    self._on_data(hdr)
                elif hdr.kind == Kind.ABORT:
                    self._table.fail(hdr.transfer_id, "aborted by prefill")
                elif hdr.kind == Kind.BYE:
                    reason = "closed by prefill"
                    break
        except PairBroken as e:
            reason = str(e)
        except Exception as e:
            log.exception("KV receiver %s crashed", self.endpoint.group_name)
            reason = f"receiver error: {e!r}"
        finally:
            self._teardown(reason)

    def _on_data(self, hdr: ChunkHeader) -> None:
        verdict = self._table.begin(hdr, self, self._cfg.grace_s)
        accepted = verdict is Verdict.ACCEPT
        error = None
        try:
            deadline = time.monotonic() + self._cfg.op_timeout_s
            payload = self._pair.bulk.recv(hdr, deadline) if hdr.payload_bytes else None
            aux = self._pair.recv_aux(hdr.aux_len, deadline) if hdr.aux_len else b""
            if accepted:
                error = self._deliver(hdr, payload, deadline)
            self._pair.bulk.release(hdr)
        except BaseException as e:
            if accepted:
                self._table.end(hdr, error=f"pair {self.endpoint.group_name} failed mid-chunk: {e}")
            raise
        if accepted:
            self._table.end(hdr, aux=aux, error=error)
        elif verdict is Verdict.UNKNOWN:
            log.warning("KV chunk %d of unknown/finished transfer %d (%d B) drained and dropped",
                        hdr.seq, hdr.transfer_id, hdr.payload_bytes)

    def _deliver(self, hdr: ChunkHeader, payload: torch.Tensor | None, deadline: float) -> str | None:
        try:
            if payload is not None:
                view = payload.view(hdr.dtype).view(hdr.shape)
                self._table.sink.on_chunk(hdr.transfer_id, hdr.seq, hdr.layers, hdr.tokens, hdr.heads, view)
        except Exception as e:
            log.exception("KV sink failed on transfer %d chunk %d", hdr.transfer_id, hdr.seq)
            return f"sink failed on chunk {hdr.seq}: {e!r}"
        if hdr.is_last:
            self._pair.bulk.sync(deadline)  # every copy of the transfer done before on_last
        return None

    def _teardown(self, reason: str) -> None:
        pair, self._pair = self._pair, None
        if pair is not None:
            pair.close()
        self._ipc_ring = None
        self.reason = reason
        failed = self._table.fail_owned(self, f"KV pair {self.endpoint.group_name} ended: {reason}")
        log.info("KV receiver %s ended (%s); %d transfers failed", self.endpoint.group_name, reason, len(failed))
        self.closed.set()
        safe_call(self._on_closed, self, reason)


class PairAcceptor:
    """Decode worker's pairing endpoint: hosts the TCPStore and starts one KVReceiver per Pair RPC.

    `accept(peer, bulk_backend)` is what the Pair servicer calls after check_compatible and
    handshake.choose_bulk_backend; it replaces any earlier receiver of the same peer (a re-pair
    after a break) and returns the PairResponse fields. The store listens on `bind_host` (the
    worker's --host; default advertise_host) only; port=0 lets the OS pick (see `.port`).
    """

    def __init__(self, table: ReservationTable, config: TransportConfig, *, advertise_host: str, port: int = 0,
                 device: torch.device | None = None, store_port: int | None = None,
                 bind_host: str | None = None) -> None:
        """store_port None: host the pairs' TCPStore here, listening on `bind_host` (default
        advertise_host) only; else pairs rendezvous on the store another process hosts at
        advertise_host:store_port (a decode TP follower uses its leader's)."""
        self.table, self.config, self.advertise_host, self.device = table, config, advertise_host, device
        self._lock = threading.Lock()
        self._receivers: dict[str, KVReceiver] = {}
        self._rings: dict[str, Any] = {}  # peer -> IpcRing (cuda_ipc pairs only)
        self._gen = 0
        self._store = (host_store(bind_host or advertise_host, port, config.pair_timeout_s)
                       if store_port is None else None)
        self.port: int = self._store.port if self._store is not None else store_port

    def new_name(self, peer: str) -> str:
        """A pair generation name unique on this acceptor's store."""
        with self._lock:
            self._gen += 1
            return f"kv/{peer}/g{self._gen}-{secrets.token_hex(8)}"  # unguessable: see auth.py

    def accept(self, peer: str, bulk_backend: str, name: str | None = None) -> PairEndpoint:
        """Blocking for at most heartbeat_s + 1 s (ending the peer's previous receiver): call it off
        the event loop. A same-GPU peer keeps its IPC ring across generations: a ring whose
        consumer died can never be freed (torch's IPC ref count stays up), so it is reused.
        `name`: the pair's name when the store's host minted it (`new_name`)."""
        with self._lock:
            old = self._receivers.pop(peer, None)
        if old is not None:
            old.close(timeout_s=self.config.heartbeat_s + 1.0)
        ring = None
        if bulk_backend == "cuda_ipc":
            from common.transport.nccl import IpcRing  # lazy: CUDA only

            ring = self._rings.get(peer)
            if ring is None or (old is not None and old.alive):
                ring = self._rings[peer] = IpcRing(self.config.ipc_ring_bytes, self.device)
        name = name or self.new_name(peer)
        with self._lock:
            ep = PairEndpoint(self.advertise_host, self.port, name, bulk_backend, ring.export() if ring else b"")
            r = KVReceiver(ep, self.table, self.config, device=self.device, ipc_ring=ring, on_closed=self._closed)
            self._receivers[peer] = r
        r.start()
        return ep

    def receiver(self, peer: str) -> KVReceiver | None:
        with self._lock:
            return self._receivers.get(peer)

    def _closed(self, r: KVReceiver, reason: str) -> None:
        with self._lock:
            for peer, cur in list(self._receivers.items()):
                if cur is r:
                    del self._receivers[peer]

    def close(self, timeout_s: float | None = None) -> None:
        """Stop every receiver (each ends at its next message or when its prefill goes)."""
        with self._lock:
            receivers = list(self._receivers.values())
        for r in receivers:
            r.close(timeout_s=0)
        for r in receivers:
            r.close(timeout_s)
