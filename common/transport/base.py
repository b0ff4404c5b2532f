"""Shared vocabulary of the KV transport: states, errors, config, the sink protocol.

A *pair* is one prefill rank (rank 0) and one decode rank (rank 1). On a pair, prefill streams
*chunks* of a *transfer* (one request's KV, keyed by the gateway-owned uint64 `transfer_id`):
each chunk is a header, an optional payload `[n_layers, 2, n_tokens, kv_heads, head_dim]` and,
on the last chunk only, an optional aux record. The wire format is in `wire.py`; the sender and
receiver threads in `sender.py` / `receiver.py`; group construction in `pair.py`; the CUDA bulk
channels in `nccl.py`; an in-process fake in `loopback.py`.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

BULK_BACKENDS = ("gloo", "nccl", "cuda_ipc")


class KVPoll(enum.IntEnum):
    """Transfer states (SGLang's numbering; MIN over TP ranks gives the request's state)."""

    Failed = 0
    Bootstrapping = 1  # pairing in progress (prefill) / not used (decode)
    WaitingForInput = 2  # queued or reserved, no chunk moved yet
    Transferring = 3  # at least one chunk moved
    Success = 4


class TransferError(RuntimeError):
    """A transfer failed; the message says why (timeout, peer gone, protocol, aborted)."""


class PairBroken(TransferError):
    """The pair's groups failed or timed out; every transfer on it fails and the pair is rebuilt."""


class ProtocolError(PairBroken):
    """The byte stream on a pair is not what the protocol says (bad magic/version/size)."""


@dataclass(frozen=True)
class TransportConfig:
    """Timeouts and sizes of the KV transport (docs/disaggregation.md rule 2: every wait is bounded).

    op_timeout_s: one message (header, payload, aux), one IPC credit wait, one GPU readiness wait.
    peer_timeout_s: decode gives a pair up after this long without any message (prefill sends a
        heartbeat whenever it has been idle for heartbeat_s), so it must exceed op_timeout_s +
        heartbeat_s. A gloo wait that times out closes the gloo pair, so it is never polled.
    transfer_timeout_s: decode fails a reserved transfer that sees no chunk for this long.
    reserve_grace_s: a chunk of a transfer decode has not reserved (yet) waits this long for the
        reservation (both legs are dispatched in parallel) before it is drained and dropped; the
        pair is held meanwhile, so it must stay below op_timeout_s (None: min(5 s, op_timeout_s / 2);
        read `grace_s`).
    pair_timeout_s: building a pair's groups (rendezvous, hello, NCCL warm-up).
    max_chunk_bytes: the sender splits larger chunks (bounds decode staging memory).
    ipc_ring_bytes: size of the decode-side staging ring for same-GPU (CUDA IPC) pairs.
    bind_host: local address for the gloo sockets (None: resolve this host's name).
    auth: the worker's auth.PairAuth (None or disabled: the store hello carries no proof).
    """

    op_timeout_s: float = 30.0
    peer_timeout_s: float = 60.0
    heartbeat_s: float = 2.0
    transfer_timeout_s: float = 300.0
    reserve_grace_s: float | None = None
    pair_timeout_s: float = 60.0
    max_chunk_bytes: int = 256 << 20
    max_aux_bytes: int = 16 << 20
    ipc_ring_bytes: int = 512 << 20
    bind_host: str | None = None
    auth: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("op_timeout_s", "peer_timeout_s", "heartbeat_s", "transfer_timeout_s", "pair_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TransportConfig.{name} must be positive, got {getattr(self, name)}")
        if self.peer_timeout_s <= self.op_timeout_s + self.heartbeat_s:
            raise ValueError(
                f"TransportConfig.peer_timeout_s ({self.peer_timeout_s}) must exceed op_timeout_s + "
                f"heartbeat_s ({self.op_timeout_s + self.heartbeat_s})")
        if self.reserve_grace_s is not None and not 0 <= self.reserve_grace_s < self.op_timeout_s:
            raise ValueError(f"TransportConfig.reserve_grace_s ({self.reserve_grace_s}) must be in [0, op_timeout_s)")
        if self.max_chunk_bytes < 4096 or self.ipc_ring_bytes < 2 * 4096:
            raise ValueError("TransportConfig.max_chunk_bytes must be >= 4096 and ipc_ring_bytes >= 8192")


    @property
    def grace_s(self) -> float:
        return self.reserve_grace_s if self.reserve_grace_s is not None else min(5.0, self.op_timeout_s / 2)


@dataclass(frozen=True)
class PairEndpoint:
    """What the decode worker's Pair RPC returns (PairResponse): where and how to build the pair."""

    store_host: str
    store_port: int
    group_name: str  # unique per pair generation
    bulk_backend: str  # one of BULK_BACKENDS
    ipc_payload: bytes = b""  # cuda_ipc only: the exported ring (nccl.IpcRingHandle)

    def __post_init__(self) -> None:
        if self.bulk_backend not in BULK_BACKENDS:
            raise ValueError(f"bulk_backend {self.bulk_backend!r} is not one of {BULK_BACKENDS}")


@dataclass(frozen=True)
class TransferStats:
    """Metrics of one finished transfer on one side (the worker exports them to Prometheus)."""

    transfer_id: int
    ok: bool
    bytes: int  # payload bytes moved (headers and aux excluded)
    seconds: float  # first chunk started -> last chunk done (0 when nothing moved)
    chunks: int  # wire chunks


StatsHook = Callable[[TransferStats], None]


class KVSink(Protocol):
    """Decode-side consumer of received chunks (the decode worker scatters into its KV pages).

    Calls for one transfer come from one receiver thread per source, in seq order (several sources
    under tensor parallelism: their calls may interleave). `heads` are the payload's global kv heads. Exactly one terminal call
    per reserved transfer: on_last or on_failed (also for cancel). Never a call after it.
    `payload` is only valid during on_chunk (it is a reused staging buffer or a slot of the IPC
    ring): copy it out on the current stream (the receiver's CUDA stream); the receiver
    synchronises that stream before it reuses the memory and before on_last.
    """

    def on_chunk(self, transfer_id: int, seq: int, layers: tuple[int, int], tokens: tuple[int, int],
                 heads: tuple[int, int], payload: torch.Tensor) -> None: ...  # [l1-l0, 2, t1-t0, h1-h0, head_dim]

    def on_last(self, transfer_id: int, aux: bytes) -> None: ...

    def on_failed(self, transfer_id: int, reason: str) -> None: ...


DoneHook = Callable[[int, bool, "TransferError | None"], None]  # (transfer_id, ok, error)


class KVSenderLike(Protocol):
    """Prefill-side surface shared by sender.KVSender (real pair) and loopback.LoopbackSender."""

    def submit(self, transfer_id: int, seq: int, layers: tuple[int, int], tokens: tuple[int, int],
               kv_tensor: torch.Tensor | None, is_last: bool, aux: bytes | None = None,
               ready_event: Any = None) -> None: ...

    def abort(self, transfer_id: int, reason: str = ...) -> bool: ...

    def poll(self, transfer_id: int) -> KVPoll | None: ...

    def close(self, timeout_s: float | None = None) -> None: ...


def safe_call(fn: Callable[..., None] | None, *args: Any) -> None:
    """Run a user callback; a failing callback is logged and never kills a transport thread."""
    if fn is None:
        return
    try:
        fn(*args)
    except Exception:
        logging.getLogger("common.transport").exception("KV transport callback %r failed", fn)
