"""Building a pair's process groups straight from a TCPStore, without the global default group.

The decode worker hosts the TCPStore (`host_store`); every pair generation gets a fresh
`group_name`, and both sides build, from their own store client:
  - a gloo group (rank 0 = prefill, rank 1 = decode) on PrefixStore(group_name + "/gloo") for
    headers, aux and control messages, and
  - a bulk channel: the same gloo group (CPU), a ProcessGroupNCCL on PrefixStore(group_name +
    "/nccl") (two GPUs) or the decode-side CUDA IPC ring (two processes on one GPU); the CUDA
    ones live in nccl.py and are imported lazily.

Gloo facts this module is built around (measured with torch 2.13): a gloo wait that times out
closes the gloo pair for good ("Application timeout caused pair closure"), `abort()` and
`shutdown()` do not wake a pending receive, `is_completed()` of a receive stays False until
`wait()` is called, and a message longer than the posted buffer aborts the process. So each
wait is done once, with the op's whole deadline; a timeout is a broken pair, never a poll.
A blocking store `get` also blocks every other call on the same store client, so each side of
each pair opens its own client.
"""

from __future__ import annotations

import datetime
import hmac
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from common.transport.base import PairBroken, PairEndpoint, ProtocolError, TransferError, TransportConfig
from common.transport.wire import HEADER_WORDS, TAG_AUX, TAG_HEADER, TAG_PAYLOAD, ChunkHeader, hello_bytes

PREFILL_RANK, DECODE_RANK = 0, 1
log = logging.getLogger(__name__)


def host_store(host: str, port: int = 0, timeout_s: float = 60.0) -> dist.TCPStore:
    """The decode worker's store (is_master), listening on `host` only; port 0 lets the OS pick
    (read `.port`). A TCPStore given a host name still listens on every interface, so the socket
    is bound here and handed over as `master_listen_fd` (the store owns and closes it)."""
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
        bound = sock.getsockname()[1]
        store = dist.TCPStore(host, bound, None, True, datetime.timedelta(seconds=timeout_s),
                              wait_for_workers=False, master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()
    return store


def connect_store(host: str, port: int, timeout_s: float = 60.0) -> dist.TCPStore:
    """A private client connection (one per pair side: a blocking get blocks the whole client)."""
    return dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=timeout_s))


def gloo_op(issue: Callable[[], Any], deadline: float, what: str) -> None:
    """Post a gloo send/recv and wait for it once, until the deadline. Any failure -- raised when
    posting (the gloo pair is already closed) or when waiting -- means the pair is broken."""
    try:
        work = issue()
        work.wait(datetime.timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
    except RuntimeError as e:
        raise PairBroken(f"{what} failed: {e}") from e


def build_gloo(store: dist.Store, group_name: str, rank: int, config: TransportConfig) -> Any:
    timeout = datetime.timedelta(seconds=config.pair_timeout_s)
    prefix = dist.PrefixStore(group_name + "/gloo", store)
    if config.bind_host is None:
        return dist.ProcessGroupGloo(prefix, rank, 2, timeout)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=config.bind_host)]
    return dist.ProcessGroupGloo(prefix, rank, 2, opts)


class BulkChannel(Protocol):
    """Moves payload bytes (flat uint8) of one pair. Sender: stage() then, after the header,
    send(). Receiver: recv() after the header, release() once the sink is done with the view.
    `stream` is the CUDA stream the owning thread makes current (None on CPU)."""

    stream: Any
    max_chunk_bytes: int

    def stage(self, data: torch.Tensor, deadline: float) -> tuple[int, int]: ...  # (bulk_offset, ring_advance)

    def send(self, data: torch.Tensor, deadline: float) -> None: ...

    def recv(self, header: ChunkHeader, deadline: float) -> torch.Tensor: ...  # uint8 [payload_bytes]

    def release(self, header: ChunkHeader) -> None: ...

    def sync(self, deadline: float) -> None: ...  # all work queued on `stream` is done

    def warmup(self, deadline: float) -> None: ...

    def close(self) -> None: ...


class GlooBulk:
    """CPU payloads over the pair's gloo group (TAG_PAYLOAD)."""

    stream = None

    def __init__(self, ctrl: Any, rank: int, config: TransportConfig) -> None:
        self._pg, self._peer = ctrl, 1 - rank
        self.max_chunk_bytes = config.max_chunk_bytes

    def stage(self, data: torch.Tensor, deadline: float) -> tuple[int, int]:
        if data.device.type != "cpu":
            raise TransferError(f"gloo bulk channel needs CPU payloads, got {data.device}")
        return 0, 0

    def send(self, data: torch.Tensor, deadline: float) -> None:
        gloo_op(lambda: self._pg.send([data], self._peer, TAG_PAYLOAD), deadline, "payload send")

    def recv(self, header: ChunkHeader, deadline: float) -> torch.Tensor:
        buf = torch.empty(header.payload_bytes, dtype=torch.uint8)
        gloo_op(lambda: self._pg.recv([buf], self._peer, TAG_PAYLOAD), deadline, "payload receive")
        return buf

    def release(self, header: ChunkHeader) -> None:
        pass

    def sync(self, deadline: float) -> None:
        pass

    def warmup(self, deadline: float) -> None:
        pass

    def close(self) -> None:
        self._pg = None


@dataclass
class PairChannels:
    """One side of a built pair: private store client, gloo control group, bulk channel."""

    endpoint: PairEndpoint
    rank: int
    store: Any
    ctrl: Any
    bulk: Any
    config: TransportConfig
    _closed: bool = field(default=False, repr=False)

    @property
    def peer(self) -> int:
        return 1 - self.rank

    def send_header(self, header: ChunkHeader, deadline: float) -> None:
        words = header.encode()
        gloo_op(lambda: self.ctrl.send([words], self.peer, TAG_HEADER), deadline, f"{header.kind.name} header send")

    def recv_header(self, deadline: float) -> ChunkHeader:
        buf = torch.empty(HEADER_WORDS, dtype=torch.int64)
        gloo_op(lambda: self.ctrl.recv([buf], self.peer, TAG_HEADER), deadline, "header receive")
        return ChunkHeader.decode(buf, max_payload=self.config.max_chunk_bytes, max_aux=self.config.max_aux_bytes)

    def send_aux(self, aux: bytes, deadline: float) -> None:
        t = torch.frombuffer(bytearray(aux), dtype=torch.uint8)
        gloo_op(lambda: self.ctrl.send([t], self.peer, TAG_AUX), deadline, "aux send")

    def recv_aux(self, n: int, deadline: float) -> bytes:
        buf = torch.empty(n, dtype=torch.uint8)
        gloo_op(lambda: self.ctrl.recv([buf], self.peer, TAG_AUX), deadline, "aux receive")
        return buf.numpy().tobytes()

    def close(self) -> None:
        """Abort and drop everything; the peer's pending operations fail (its pair breaks)."""
        if self._closed:
            return
        self._closed = True
        for fn in (getattr(self.bulk, "close", None), getattr(self.ctrl, "abort", None)):
            try:
                if fn is not None:
                    fn()
            except Exception as e:  # noqa: BLE001 - teardown must not raise
                log.debug("pair %s teardown: %s", self.endpoint.group_name, e)
        self.ctrl = self.bulk = self.store = None


def open_pair(endpoint: PairEndpoint, rank: int, config: TransportConfig, device: torch.device | None,
              should_stop: Any = None, ipc_ring: Any = None) -> PairChannels:
    """Build one side of a pair (blocking, bounded by config.pair_timeout_s).

    Prefill (rank 0) writes the hello into the store, then builds; decode (rank 1) polls for the
    hello (so that `should_stop()` can interrupt it), checks it, then builds. Both then run the
    bulk channel's warm-up (NCCL creates its communicator there, not inside the first transfer).
    """
    deadline = time.monotonic() + config.pair_timeout_s
    try:
        store = connect_store(endpoint.store_host, endpoint.store_port, config.pair_timeout_s)
    except RuntimeError as e:
        raise PairBroken(f"pair {endpoint.group_name}: store {endpoint.store_host}:{endpoint.store_port} "
                         f"unreachable: {e}") from e
    key = endpoint.group_name + "/hello"
    hello = hello_bytes() + (config.auth.hello_proof(endpoint.group_name) if config.auth is not None else b"")
    if rank == PREFILL_RANK:
        store.set(key, hello)
    else:
        while True:
            try:
                store.wait([key], datetime.timedelta(seconds=0.2))
                break
            except Exception as e:
                if (should_stop is not None and should_stop()) or time.monotonic() > deadline:
                    raise PairBroken(f"pair {endpoint.group_name}: prefill did not arrive within "
                                     f"{config.pair_timeout_s}s") from e
        got = store.get(key)
        if not hmac.compare_digest(got, hello):
            theirs = got.split(b" glmserve-auth")[0][:64]  # never the proof itself
            if theirs != hello_bytes():
                raise ProtocolError(f"pair {endpoint.group_name}: peer speaks {theirs!r}, we speak {hello_bytes()!r}")
            raise ProtocolError(f"pair {endpoint.group_name}: the peer's hello carries no valid cluster-secret "
                                "proof; no group is built")
    try:
        ctrl = build_gloo(store, endpoint.group_name, rank, config)
    except RuntimeError as e:
        raise PairBroken(f"pair {endpoint.group_name}: gloo group not built: {e}") from e
    channels = PairChannels(endpoint, rank, store, ctrl, None, config)
    try:
        if endpoint.bulk_backend == "gloo":
            channels.bulk = GlooBulk(ctrl, rank, config)
        else:
            from common.transport import nccl  # lazy: the only module touching NCCL / CUDA IPC

            channels.bulk = nccl.make_bulk(endpoint, rank, store, config, device, ipc_ring)
        channels.bulk.warmup(deadline)
    except Exception as e:
        channels.close()
        if isinstance(e, TransferError):
            raise
        raise PairBroken(f"pair {endpoint.group_name}: {endpoint.bulk_backend} channel not built: {e}") from e
    return channels
