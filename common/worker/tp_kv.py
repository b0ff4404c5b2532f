"""KV transfer under tensor parallelism: what the leaders tell their followers, what the followers do,
and what they report back (docs/disaggregation.md §6).

Every rank moves its own kv heads over its own pairs, one per stream of `handshake.transfer_plan`;
control stays with the leaders (rank 0), which own requests and pages:
- prefill: for every chunk the leader queues on its own streams it publishes a KvSendPlan (decode
  address and TP, transfer, seq, layers, tokens, pages, last); each follower with streams to that
  decode worker gathers the same region of its pool and sends its streams' heads, then reports
  KV_SENT once per transfer (all its streams done, or the first failed). KvAbortPlan aborts. A
  follower reads plans between forwards: its chunks leave once the forward that wrote them ended.
- decode: the leader publishes each reservation (KvExpectPlan, transfer and pages) before it
  answers the prefill side, and its withdrawal; each follower reserves in its own
  ReservationTable, scatters its streams' chunks into its pool and reports KV_LANDED or
  KV_FAILED. Pair RPCs reach the leader, which hands a stream aimed at follower j to it (PairPlan)
  and answers with the endpoint the follower built (PAIRED, with its IPC ring if any).
Followers never see a request. The aux record rides on the (prefill 0, decode 0) stream only: the
decode leader sends followers the draft state inside its forward plans.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, ClassVar

import grpc
import torch

from common.runtime.runner import ModelRunner
from common.runtime.step_plan import WORKER_KINDS, register
from common.serving.grpc_server import client_channel_options
from common.transport.auth import PAIR_AUTH_KEY, PAIR_PROOF_KEY, AuthError, PairAuth
from common.transport.base import PairEndpoint, TransferError, TransportConfig
from common.transport.handshake import PairingError, Stream, transfer_plan
from common.transport.receiver import PairAcceptor, RankLayout, ReservationTable
from common.transport.sender import KVSender, SenderStream
from protos import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

# follower -> leader reports (after common/worker/follower.py's READY and ERROR)
KV_SENT, KV_LANDED, KV_FAILED, PAIRED = 16, 17, 18, 19


# ------------------------------------------------------------------------------------ codec
class _Out:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def ints(self, *v: int) -> _Out:
        self.parts.append(struct.pack(f"<{len(v)}q", *v))
        return self

    def tid(self, v: int) -> _Out:
        self.parts.append(struct.pack("<Q", v))
        return self

    def blob(self, b: bytes) -> _Out:
        self.ints(len(b))
        self.parts.append(b)
        return self

    def text(self, s: str) -> _Out:
        return self.blob(s.encode())

    def seq(self, v: tuple[int, ...]) -> _Out:
        return self.ints(len(v), *v)

    def done(self) -> bytes:
        return b"".join(self.parts)


class _In:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def ints(self, n: int = 1) -> tuple[int, ...]:
        v = struct.unpack_from(f"<{n}q", self.data, self.pos)
        self.pos += 8 * n
        return v

    def int(self) -> int:
        return self.ints()[0]

    def tid(self) -> int:
        (v,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return v

    def blob(self) -> bytes:
        n = self.int()
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def text(self) -> str:
        return self.blob().decode()

    def seq(self) -> tuple[int, ...]:
        return self.ints(self.int())


# ------------------------------------------------------------------------------------ plans
@dataclass(frozen=True)
class KvSendPlan:
    kind: ClassVar[int] = WORKER_KINDS
    address: str
    decode_tp: int
    transfer_id: int
    seq: int
    layers: tuple[int, int]
    tokens: tuple[int, int]
    pages: tuple[int, ...]
    is_last: bool

    def body(self) -> bytes:
        return (_Out().text(self.address).tid(self.transfer_id).ints(self.decode_tp, self.seq, *self.layers,
                                                                      *self.tokens, int(self.is_last))
                .seq(self.pages).done())

    @classmethod
    def from_body(cls, kind: int, body: bytes) -> KvSendPlan:
        r = _In(body)
        address, tid = r.text(), r.tid()
        tp, seq, l0, l1, t0, t1, last = r.ints(7)
        return cls(address, tp, tid, seq, (l0, l1), (t0, t1), r.seq(), bool(last))


@dataclass(frozen=True)
class KvAbortPlan:
    kind: ClassVar[int] = WORKER_KINDS + 1
    address: str
    transfer_id: int
    reason: str

    def body(self) -> bytes:
        return _Out().text(self.address).tid(self.transfer_id).text(self.reason).done()

    @classmethod
    def from_body(cls, kind: int, body: bytes) -> KvAbortPlan:
        r = _In(body)
        return cls(r.text(), r.tid(), r.text())


@dataclass(frozen=True)
class KvExpectPlan:
    kind: ClassVar[int] = WORKER_KINDS + 2
    transfer_id: int
    pages: tuple[int, ...]
    cached_tokens: int = 0  # leading tokens the pages hold already (prefix cache): never written

    def body(self) -> bytes:
        return _Out().tid(self.transfer_id).seq(self.pages).ints(self.cached_tokens).done()

    @classmethod
    def from_body(cls, kind: int, body: bytes) -> KvExpectPlan:
        r = _In(body)
        return cls(r.tid(), r.seq(), r.int())


def skip_held(held: int, tokens: tuple[int, int],
              payload: torch.Tensor) -> tuple[tuple[int, int], torch.Tensor] | None:
    """A received chunk without the tokens below `held` (a reservation's cached prefix, in pages other
    requests may share): the rest of it, or None when nothing is left."""
    cut = held - tokens[0]
    if cut <= 0:
        return tokens, payload
    if cut >= tokens[1] - tokens[0]:
        return None
    return (tokens[0] + cut, tokens[1]), payload[:, :, cut:]


@dataclass(frozen=True)
class KvWithdrawPlan:
    kind: ClassVar[int] = WORKER_KINDS + 3
    transfer_id: int

    def body(self) -> bytes:
        return _Out().tid(self.transfer_id).done()

    @classmethod
    def from_body(cls, kind: int, body: bytes) -> KvWithdrawPlan:
        return cls(_In(body).tid())


@dataclass(frozen=True)
class PairPlan:
    """Decode follower: receive the stream of prefill `peer` over the pair `name` (leader's store)."""

    kind: ClassVar[int] = WORKER_KINDS + 4
    peer: str
    name: str
    backend: str
    store_host: str
    store_port: int

    def body(self) -> bytes:
        return _Out().text(self.peer).text(self.name).text(self.backend).text(self.store_host).ints(
            self.store_port).done()

    @classmethod
    def from_body(cls, kind: int, body: bytes) -> PairPlan:
        r = _In(body)
        return cls(r.text(), r.text(), r.text(), r.text(), r.int())


@dataclass(frozen=True)
class InfoPlan:
    """The leader's WorkerInfo (serialized): prefill followers pair with it."""

    kind: ClassVar[int] = WORKER_KINDS + 5
    info: bytes

    def body(self) -> bytes:
        return self.info

    @classmethod
    def from_body(cls, kind: int, body: bytes) -> InfoPlan:
        return cls(body)


KV_PLANS = (KvSendPlan, KvAbortPlan, KvExpectPlan, KvWithdrawPlan, PairPlan, InfoPlan)
for _cls in KV_PLANS:
    register((_cls.kind,), _cls.from_body)


# ------------------------------------------------------------------------------------ reports
def sent_report(transfer_id: int, error: str | None) -> bytes:
    return _Out().tid(transfer_id).ints(int(error is None)).text(error or "").done()


def read_sent(payload: bytes) -> tuple[int, str | None]:
    r = _In(payload)
    tid, ok, err = r.tid(), r.int(), r.text()
    return tid, None if ok else err


def landed_report(transfer_id: int, error: str | None = None) -> bytes:
    return _Out().tid(transfer_id).text(error or "").done()


def read_landed(payload: bytes) -> tuple[int, str]:
    r = _In(payload)
    return r.tid(), r.text()


def paired_report(name: str, ipc_payload: bytes, error: str = "") -> bytes:
    return _Out().text(name).blob(ipc_payload).text(error).done()


def read_paired(payload: bytes) -> tuple[str, bytes, str]:
    """(pair name, the follower's IPC ring export, why it could not pair: "" when it did)."""
    r = _In(payload)
    return r.text(), r.blob(), r.text()


class Reporter:
    """A follower's report pipe, shared by its threads (one whole message at a time)."""

    def __init__(self, pipe: Connection) -> None:
        self.pipe, self._lock = pipe, threading.Lock()

    def __call__(self, kind: int, payload: bytes | str = b"") -> None:
        data = payload.encode() if isinstance(payload, str) else payload
        with self._lock:
            self.pipe.send_bytes(struct.pack("<B", kind) + data)


# ------------------------------------------------------------------------------------ pairing
def pair_rpc(address: str, info: worker_pb2.WorkerInfo, src_rank: int, dst_rank: int,
             timeout_s: float, auth: PairAuth | None = None) -> PairEndpoint:
    """The decode worker's Pair RPC for one stream (runs on a sender thread; blocking, bounded). With
    a cluster secret the call carries our proof and the decode worker must prove it back
    (common/transport/auth.py); a refusal either way is a PairingError."""
    metadata, nonce = (), ""
    if auth is not None and auth.enabled:
        token, nonce = auth.request_token(info.worker_id)
        metadata = ((PAIR_AUTH_KEY, token),)
    with grpc.insecure_channel(address, options=client_channel_options()) as ch:
        try:
            resp, call = worker_pb2_grpc.DecodeWorkerStub(ch).Pair.with_call(
                worker_pb2.PairRequest(prefill=info, src_rank=src_rank, dst_rank=dst_rank), timeout=timeout_s,
                metadata=metadata)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED):
                raise PairingError(e.details()) from None
            raise TransferError(f"Pair RPC to decode worker {address} failed: {e.code().name}: "
                                f"{e.details()}") from None
    if nonce:
        try:
            auth.check_response(dict(call.trailing_metadata() or ()).get(PAIR_PROOF_KEY), nonce, resp.group_name)
        except AuthError as e:
            raise PairingError(f"decode worker {address}: {e}") from None
    return PairEndpoint(resp.store_host, resp.store_port, resp.group_name, resp.bulk_backend, resp.ipc_payload)


def stream_senders(address: str, streams: list[Stream], rank: int, tp: int, info: Callable[[], Any],
                   on_done: Callable[..., None], config: TransportConfig, device: torch.device | None,
                   **kw: Any) -> dict[int, KVSender]:
    """One KVSender per stream of prefill rank `rank` to the decode worker at `address`, by decode rank."""
    def pair_fn(dst: int) -> Callable[[], PairEndpoint]:
        return lambda: pair_rpc(address, info(), rank, dst, 10.0, config.auth)

    return {s.dst: KVSender(pair_fn(s.dst), on_done, config, device=device, name=f"kv-sender-{address}-{rank}>{s.dst}",
                            stream=SenderStream(rank, tp, s.head_lo), **kw) for s in streams}


# ------------------------------------------------------------------------------------ followers
class PrefillFollowerKv:
    """A prefill follower's streams: gathers its heads of every chunk its leader sends, sends them."""

    def __init__(self, rank: int, tp: int, runner: ModelRunner, config: TransportConfig, report: Reporter) -> None:
        self.rank, self.tp, self.runner, self.config, self.report = rank, tp, runner, config, report
        self.kv_heads = runner.config.num_key_value_heads
        self.info: worker_pb2.WorkerInfo | None = None
        self._senders: dict[str, dict[int, KVSender]] = {}  # decode address -> decode rank -> sender
        self._lock = threading.Lock()
        self._pending: dict[int, int] = {}  # transfer -> streams not done
        self._done: set[int] = set()  # transfers reported (late callbacks ignored)

    def on_plan(self, plan: Any) -> None:
        if isinstance(plan, InfoPlan):
            self.info = worker_pb2.WorkerInfo.FromString(plan.info)
        elif isinstance(plan, KvSendPlan):
            self._send(plan)
        elif isinstance(plan, KvAbortPlan):
            for sender in self._senders.get(plan.address, {}).values():
                sender.abort(plan.transfer_id, plan.reason)

    def _send(self, plan: KvSendPlan) -> None:
        streams = [s for s in transfer_plan(self.kv_heads, self.tp, plan.decode_tp) if s.src == self.rank]
        if not streams:
            return
        senders = self._senders.get(plan.address)
        if senders is None:
            senders = self._senders[plan.address] = stream_senders(
                plan.address, streams, self.rank, self.tp, lambda: self.info, self._stream_done, self.config,
                self.runner.device if self.runner.device.type == "cuda" else None)
        tid = plan.transfer_id
        if plan.seq == 0:
            with self._lock:
                self._pending[tid] = len(streams)
        (l0, l1), (t0, t1) = plan.layers, plan.tokens
        first = self.runner.kv_heads[0]
        data = self.runner.kv_pool.gather_tokens((l0, l1), list(plan.pages), t1 - t0, token_start=t0)
        event = None
        if data.is_cuda:
            event = torch.cuda.Event()
            event.record()
        for s in streams:
            part = data[:, :, :, s.head_lo - first:s.head_hi - first]
            senders[s.dst].submit(tid, plan.seq, plan.layers, plan.tokens, part, plan.is_last, None, event)

    def _stream_done(self, transfer_id: int, ok: bool, error: TransferError | None) -> None:
        with self._lock:
            if transfer_id in self._done or transfer_id not in self._pending:
                return
            self._pending[transfer_id] -= 1
            if ok and self._pending[transfer_id] > 0:
                return
            del self._pending[transfer_id]
            self._done.add(transfer_id)
        self.report(KV_SENT, sent_report(transfer_id, None if ok else str(error or "KV stream failed")))

    def close(self) -> None:
        for senders in self._senders.values():
            for s in senders.values():
                s.close(2.0)


class _FollowerSink:
    """A decode follower's KVSink: chunks into its pool's heads, terminal calls reported to the leader."""

    def __init__(self, runner: ModelRunner, report: Reporter) -> None:
        self.pool, self.first_head, self.report = runner.kv_pool, runner.kv_heads[0], report
        self._lock = threading.Lock()
        self._pages: dict[int, list[int]] = {}
        self._held: dict[int, int] = {}  # transfer -> its leading cached tokens

    def expect(self, transfer_id: int, pages: list[int], cached_tokens: int = 0) -> None:
        with self._lock:
            self._pages[transfer_id] = pages
            self._held[transfer_id] = cached_tokens

    def withdraw(self, transfer_id: int) -> bool:
        with self._lock:
            self._held.pop(transfer_id, None)
            return self._pages.pop(transfer_id, None) is not None

    def on_chunk(self, transfer_id: int, seq: int, layers: tuple[int, int], tokens: tuple[int, int],
                 heads: tuple[int, int], payload: torch.Tensor) -> None:
        with self._lock:
            pages = self._pages.get(transfer_id)
            rest = skip_held(self._held.get(transfer_id, 0), tokens, payload) if pages is not None else None
            if rest is not None:
                self.pool.scatter_tokens(layers, pages, rest[0][0], rest[1], heads[0] - self.first_head)

    def on_last(self, transfer_id: int, aux: bytes) -> None:
        with self._lock:
            known = self._pages.pop(transfer_id, None) is not None
        if known:
            self.report(KV_LANDED, landed_report(transfer_id))

    def on_failed(self, transfer_id: int, reason: str) -> None:
        with self._lock:
            known = self._pages.pop(transfer_id, None) is not None
        if known:
            self.report(KV_FAILED, landed_report(transfer_id, reason))


class DecodeFollowerKv:
    """A decode follower's receivers: reservations its leader publishes, its streams' pairs."""

    def __init__(self, rank: int, tp: int, runner: ModelRunner, config: TransportConfig, report: Reporter) -> None:
        self.runner, self.config, self.report = runner, config, report
        self.sink = _FollowerSink(runner, report)
        layout = RankLayout(runner.config.num_key_value_heads, tp, rank)
        self.table = ReservationTable(self.sink, config.transfer_timeout_s, layout=layout)
        self.acceptor: PairAcceptor | None = None

    def on_plan(self, plan: Any) -> None:
        if isinstance(plan, KvExpectPlan):
            self.sink.expect(plan.transfer_id, list(plan.pages), plan.cached_tokens)
            try:
                self.table.reserve(plan.transfer_id)
            except TransferError as e:
                self.sink.on_failed(plan.transfer_id, str(e))
        elif isinstance(plan, KvWithdrawPlan):
            if self.sink.withdraw(plan.transfer_id):
                self.table.cancel(plan.transfer_id, "withdrawn by the decode leader")
        elif isinstance(plan, PairPlan):
            threading.Thread(target=self._pair, args=(plan,), name="kv-pair", daemon=True).start()

    def _pair(self, plan: PairPlan) -> None:
        """Off the plan loop: replacing a receiver may wait for the old one to end."""
        if self.acceptor is None:
            dev = self.runner.device if self.runner.device.type == "cuda" else None
            self.acceptor = PairAcceptor(self.table, self.config, advertise_host=plan.store_host,
                                         store_port=plan.store_port, device=dev)
        try:
            ep = self.acceptor.accept(plan.peer, plan.backend, plan.name)
            self.report(PAIRED, paired_report(plan.name, ep.ipc_payload))
        except Exception as e:
            log.exception("pairing %s failed", plan.name)
            self.report(PAIRED, paired_report(plan.name, b"", str(e) or type(e).__name__))

    def close(self) -> None:
        if self.acceptor is not None:
            self.acceptor.close(2.0)
        self.table.close()


def follower_kv(role: str, rank: int, tp: int, runner: ModelRunner, config: TransportConfig | None,
                report: Reporter) -> PrefillFollowerKv | DecodeFollowerKv | None:
    """The KV agent of a follower of this role (None without a KV transport: `glmserve generate`)."""
    if config is None:
        return None
    cls = PrefillFollowerKv if role == "prefill" else DecodeFollowerKv
    return cls(rank, tp, runner, config, report)
