"""CUDA bulk channels of a pair: NCCL between two GPUs, CUDA IPC between two processes on one GPU.

The only transport module that touches NCCL process groups and CUDA IPC handles; pair.py imports
it lazily. Both channels follow pair.BulkChannel and run on a dedicated CUDA stream that the
owning thread makes current, so the sink's copies (decode) and the readiness wait (prefill) are
ordered with the transfer without blocking the compute stream.

NCCL: ProcessGroupNCCL(PrefixStore(group_name + "/nccl")), rank 0 = prefill. An NCCL operation
cannot be cancelled, so each one is polled (`is_completed`) against its deadline and, on
timeout, the whole group is aborted (ncclCommAbort) and the pair rebuilt. The group's own
timeout is set well above ours so that torch's watchdog never kills the process first.

CUDA IPC: NCCL cannot pair two processes on the same GPU. Decode allocates a byte ring on its
GPU and exports it in PairResponse.ipc_payload (`IpcRingHandle`). Prefill copies each payload
into the ring on its stream, waits for the copy, then sends the header with the ring offset.
Decode hands the sink a view of the ring and, once the sink's copies are done, returns the
bytes through a store counter (`<group_name>/ipc_freed`) that prefill reads when it is short.
"""

from __future__ import annotations

import datetime
import logging
import os
import struct
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from common.transport.base import PairBroken, PairEndpoint, ProtocolError, TransferError, TransportConfig
from common.transport.wire import ChunkHeader

log = logging.getLogger(__name__)

GPU_ENV_DEFAULTS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
_ALIGN = 256


def set_gpu_env_defaults() -> None:
    """NVLink multicast off (see the device notes); must run before the first communicator."""
    for k, v in GPU_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)


def device_uuid(device: torch.device | int) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def _poll(done: Any, deadline: float, what: str) -> None:
    """Poll `done()` (NCCL work, CUDA event) until the deadline: yield-spin for the first 2 ms
    (most copies and messages finish there), then 50 us naps up to 20 ms, then 0.5 ms naps."""
    start = time.monotonic()
    while True:
        try:
            if done():
                return
        except RuntimeError as e:
            raise PairBroken(f"{what} failed: {e}") from e
        now = time.monotonic()
        if now > deadline:
            raise PairBroken(f"{what} did not complete before its deadline")
        waited = now - start
        time.sleep(0 if waited < 0.002 else 0.00005 if waited < 0.02 else 0.0005)


def _issue(fn: Any, what: str) -> Any:
    try:
        return fn()
    except RuntimeError as e:
        raise PairBroken(f"{what} failed: {e}") from e


def sync_stream(stream: torch.cuda.Stream, deadline: float, what: str) -> None:
    ev = torch.cuda.Event()
    ev.record(stream)
    _poll(ev.query, deadline, what)


class _CudaBulk:
    def __init__(self, device: torch.device, config: TransportConfig) -> None:
        if device is None or device.type != "cuda":
            raise TransferError(f"a CUDA bulk channel needs a CUDA device, got {device}")
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.max_chunk_bytes = config.max_chunk_bytes

    def sync(self, deadline: float) -> None:
        sync_stream(self.stream, deadline, "bulk stream sync")

    def _check(self, data: torch.Tensor) -> None:
        if data.device != self.device:
            raise TransferError(f"payload on {data.device}, pair bulk channel on {self.device}")


class NcclBulk(_CudaBulk):
    def __init__(self, store: Any, group_name: str, rank: int, device: torch.device, config: TransportConfig) -> None:
        super().__init__(device, config)
        set_gpu_env_defaults()
        torch.cuda.set_device(device)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = datetime.timedelta(seconds=3 * config.op_timeout_s + config.pair_timeout_s + 60)
        self._pg: Any = dist.ProcessGroupNCCL(dist.PrefixStore(group_name + "/nccl", store), rank, 2, opts)
        self._peer = 1 - rank

    def stage(self, data: torch.Tensor, deadline: float) -> tuple[int, int]:
        self._check(data)
        return 0, 0

    def send(self, data: torch.Tensor, deadline: float) -> None:
        with torch.cuda.stream(self.stream):  # NCCL's stream waits for this one (ready event, copies)
            work = _issue(lambda: self._pg.send([data], self._peer, 0), "NCCL payload send")
        _poll(work.is_completed, deadline, "NCCL payload send")
        work.wait()

    def recv(self, header: ChunkHeader, deadline: float) -> torch.Tensor:
        return self._recv(header.payload_bytes, deadline, "NCCL payload receive")

    def release(self, header: ChunkHeader) -> None:
        pass

    def warmup(self, deadline: float) -> None:
        """Creates the communicator now (both sides) instead of inside the first transfer."""
        if self._peer == 1:
            self.send(torch.full((1,), 7, dtype=torch.uint8, device=self.device), deadline)
        elif int(self._recv(1, deadline, "NCCL warm-up receive").item()) != 7:
            raise ProtocolError("NCCL warm-up byte corrupted")

    def _recv(self, n: int, deadline: float, what: str) -> torch.Tensor:
        with torch.cuda.stream(self.stream):
            buf = torch.empty(n, dtype=torch.uint8, device=self.device)  # [n] uint8 staging
            work = _issue(lambda: self._pg.recv([buf], self._peer, 0), what)
        _poll(work.is_completed, deadline, what)
        with torch.cuda.stream(self.stream):
            work.wait()  # orders our stream after the receive
        return buf

    def close(self) -> None:
        pg, self._pg = self._pg, None
        if pg is not None:
            try:
                pg.abort()  # ncclCommAbort: releases kernels stuck on a vanished peer
            except Exception as e:  # noqa: BLE001 - teardown must not raise
                log.debug("NCCL abort: %s", e)


@dataclass(frozen=True)
class IpcRingHandle:
    """The bytes of PairResponse.ipc_payload: a CUDA IPC export of decode's ring (struct format,
    little endian: magic, version, then length-prefixed / fixed fields in declaration order)."""

    device_uuid: str
    nbytes: int
    handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes | None
    event_sync_required: bool

    _MAGIC = b"GLMIPC"
    _VERSION = 1

    def to_bytes(self) -> bytes:
        def blob(b: bytes | None) -> bytes:
            return struct.pack("<i", -1) if b is None else struct.pack("<i", len(b)) + b

        return (self._MAGIC + struct.pack("<H", self._VERSION) + blob(self.device_uuid.encode())
                + struct.pack("<QQQ", self.nbytes, self.storage_size_bytes, self.storage_offset_bytes)
                + blob(self.handle) + blob(self.ref_counter_handle) + struct.pack("<Q", self.ref_counter_offset)
                + blob(self.event_handle) + struct.pack("<?", self.event_sync_required))

    @classmethod
    def from_bytes(cls, data: bytes) -> IpcRingHandle:
        if data[:6] != cls._MAGIC or struct.unpack_from("<H", data, 6)[0] != cls._VERSION:
            raise ProtocolError("ipc_payload is not a glmserve IPC ring handle of version 1")
        pos = 8

        def take(fmt: str) -> Any:
            nonlocal pos
            vals = struct.unpack_from(fmt, data, pos)
            pos += struct.calcsize(fmt)
            return vals if len(vals) > 1 else vals[0]

        def blob() -> bytes | None:
            nonlocal pos
            n = take("<i")
            if n < 0:
                return None
            b = data[pos:pos + n]
            pos += n
            return b

        try:
            uuid = (blob() or b"").decode()
            nbytes, size_b, off_b = take("<QQQ")
            handle, ref_handle, ref_off = blob(), blob(), take("<Q")
            ev_handle, ev_sync = blob(), take("<?")
        except struct.error as e:
            raise ProtocolError(f"ipc_payload truncated: {e}") from e
        if pos != len(data) or handle is None or ref_handle is None:
            raise ProtocolError("ipc_payload malformed (size or missing handle)")
        return cls(uuid, nbytes, handle, size_b, off_b, ref_handle, ref_off, ev_handle, ev_sync)


class IpcRing:
    """Decode side: the staging ring one same-GPU pair writes into (lives as long as the pair)."""

    def __init__(self, nbytes: int, device: torch.device) -> None:
        self.device = device
        self.buf = torch.empty(nbytes, dtype=torch.uint8, device=device)  # [nbytes] uint8

    def export(self) -> bytes:
        from torch.multiprocessing.reductions import reduce_tensor

        _, a = reduce_tensor(self.buf)
        # a = (cls, size, stride, offset, storage_cls, dtype, device, handle, size_bytes, offset_bytes,
        #      requires_grad, ref_counter_handle, ref_counter_offset, event_handle, event_sync_required)
        if a[3] != 0:
            raise TransferError("IPC ring must start at its storage's first byte")
        return IpcRingHandle(device_uuid(self.device), self.buf.numel(), a[7], a[8], a[9], a[11], a[12], a[13],
                             bool(a[14])).to_bytes()


class IpcSenderBulk(_CudaBulk):
    """Prefill side of a same-GPU pair: allocates ring space in order, copies, credits via store."""

    def __init__(self, endpoint: PairEndpoint, store: Any, device: torch.device, config: TransportConfig) -> None:
        super().__init__(device, config)
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        h = IpcRingHandle.from_bytes(endpoint.ipc_payload)
        if h.device_uuid != device_uuid(device):
            raise PairBroken(f"IPC ring is on GPU {h.device_uuid}, this process uses {device_uuid(device)}")
        self._ring = rebuild_cuda_tensor(
            torch.Tensor, torch.Size([h.nbytes]), (1,), 0, torch.storage.TypedStorage, torch.uint8,
            device.index, h.handle, h.storage_size_bytes, h.storage_offset_bytes, False,
            h.ref_counter_handle, h.ref_counter_offset, h.event_handle, h.event_sync_required)
        self._store, self._key = store, endpoint.group_name + "/ipc_freed"
        self._size, self._head, self._freed = h.nbytes, 0, 0
        self.max_chunk_bytes = min(config.max_chunk_bytes, (h.nbytes // 2) // _ALIGN * _ALIGN)

    def stage(self, data: torch.Tensor, deadline: float) -> tuple[int, int]:
        self._check(data)
        n = data.numel()
        if n == 0:
            return 0, 0
        size = -(-n // _ALIGN) * _ALIGN
        pos = self._head % self._size
        waste = self._size - pos if pos + size > self._size else 0
        need = waste + size
        if need > self._size:
            raise TransferError(f"chunk of {n} B does not fit the {self._size} B IPC ring")
        while self._head + need - self._freed > self._size:
            self._freed = _issue(lambda: self._store.add(self._key, 0), "IPC credit read")
            if self._head + need - self._freed <= self._size:
                break
            if time.monotonic() > deadline:
                raise PairBroken("decode did not free IPC ring space before the deadline")
            time.sleep(0.0005)
        off = 0 if waste else pos
        with torch.cuda.stream(self.stream):
            self._ring[off:off + n].copy_(data)
        self.sync(deadline)  # the bytes must be in the ring before decode sees the header
        self._head += need
        return off, need

    def send(self, data: torch.Tensor, deadline: float) -> None:
        pass  # staged already

    def recv(self, header: ChunkHeader, deadline: float) -> torch.Tensor:
        raise TransferError("the prefill side of an IPC pair does not receive")

    def release(self, header: ChunkHeader) -> None:
        pass

    def warmup(self, deadline: float) -> None:
        pass

    def close(self) -> None:
        self._ring = None  # closes our mapping once the last view is gone


class IpcReceiverBulk(_CudaBulk):
    def __init__(self, ring: IpcRing, store: Any, group_name: str, config: TransportConfig) -> None:
        super().__init__(ring.device, config)
        self._ring: Any = ring
        self._store, self._key = store, group_name + "/ipc_freed"
        self._op_timeout = config.op_timeout_s

    def stage(self, data: torch.Tensor, deadline: float) -> tuple[int, int]:
        raise TransferError("the decode side of an IPC pair does not send")

    def send(self, data: torch.Tensor, deadline: float) -> None:
        raise TransferError("the decode side of an IPC pair does not send")

    def recv(self, header: ChunkHeader, deadline: float) -> torch.Tensor:
        n, off = header.payload_bytes, header.bulk_offset
        if off < 0 or off + n > self._ring.buf.numel() or header.ring_advance < n:
            raise ProtocolError(f"IPC chunk [{off}, {off + n}) +{header.ring_advance} outside the "
                                f"{self._ring.buf.numel()} B ring")
        return self._ring.buf[off:off + n]

    def release(self, header: ChunkHeader) -> None:
        if header.ring_advance:
            self.sync(time.monotonic() + self._op_timeout)  # the sink's copies out of the slot are done
            _issue(lambda: self._store.add(self._key, header.ring_advance), "IPC credit return")

    def warmup(self, deadline: float) -> None:
        pass

    def close(self) -> None:
        self._ring = None


def make_bulk(endpoint: PairEndpoint, rank: int, store: Any, config: TransportConfig,
              device: torch.device | None, ipc_ring: IpcRing | None = None) -> Any:
    if device is None or device.type != "cuda":
        raise TransferError(f"bulk backend {endpoint.bulk_backend!r} needs a CUDA device, got {device}")
    if endpoint.bulk_backend == "nccl":
        return NcclBulk(store, endpoint.group_name, rank, device, config)
    if rank == 0:
        return IpcSenderBulk(endpoint, store, device, config)
    if ipc_ring is None:
        raise TransferError("decode side of a cuda_ipc pair needs its IpcRing")
    return IpcReceiverBulk(ipc_ring, store, endpoint.group_name, config)
