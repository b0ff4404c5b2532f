"""Wire format pieces: chunk header, chunk splitting, IPC ring handle bytes, config checks."""

from __future__ import annotations

import pytest
import torch

from common.transport.base import PairEndpoint, ProtocolError, TransportConfig
from common.transport.nccl import IpcRingHandle
from common.transport.wire import HEADER_WORDS, ChunkHeader, Kind, i64_to_tid, split_chunk, tid_to_i64


@pytest.mark.parametrize("tid", [0, 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1])
def test_uint64_ids_survive_the_int64_header(tid: int) -> None:
    assert i64_to_tid(tid_to_i64(tid)) == tid
    h = ChunkHeader(tid, 3, (4, 8), (16, 48), True, 77, torch.bfloat16, 8, 128, Kind.DATA, 4096, 8192)
    words = h.encode()
    assert words.shape == (HEADER_WORDS,) and words.dtype == torch.int64
    assert ChunkHeader.decode(words, max_payload=1 << 30, max_aux=1 << 20) == h
    assert h.payload_bytes == 4 * 2 * 32 * 8 * 128 * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_every_kv_dtype_roundtrips(dtype: torch.dtype) -> None:
    h = ChunkHeader(1, 0, (0, 1), (0, 2), False, 0, dtype, 2, 4)
    assert ChunkHeader.decode(h.encode(), max_payload=1 << 20, max_aux=0).dtype == dtype


def test_corrupt_headers_are_protocol_errors() -> None:
    h = ChunkHeader(1, 0, (0, 1), (0, 2), False, 0, torch.bfloat16, 2, 4)
    bad = h.encode().clone()
    bad[0] = 0
    with pytest.raises(ProtocolError, match="magic"):
        ChunkHeader.decode(bad, max_payload=1 << 20, max_aux=0)
    bad = h.encode().clone()
    bad[14] += 2  # payload size disagrees with the shape
    with pytest.raises(ProtocolError, match="payload size"):
        ChunkHeader.decode(bad, max_payload=1 << 20, max_aux=0)
    with pytest.raises(ProtocolError, match="exceeds the limits"):
        ChunkHeader.decode(h.encode(), max_payload=8, max_aux=0)
    bad = h.encode().clone()
    bad[5] = -1  # layer_end < layer_start
    with pytest.raises(ProtocolError, match="ranges"):
        ChunkHeader.decode(bad, max_payload=1 << 20, max_aux=0)


def test_split_prefers_whole_layers_and_covers_everything() -> None:
    per = 100  # bytes per layer-token
    assert split_chunk((0, 4), (0, 10), per, 10_000) == [((0, 4), (0, 10))]
    assert split_chunk((0, 5), (0, 10), per, 2_000) == [((0, 2), (0, 10)), ((2, 4), (0, 10)), ((4, 5), (0, 10))]
    pieces = split_chunk((3, 5), (7, 30), per, 1_000)  # one layer is 2300 B: cut along tokens
    assert pieces[0] == ((3, 4), (7, 17)) and pieces[-1] == ((4, 5), (27, 30))
    covered = sorted((lay, t) for (l0, l1), (t0, t1) in pieces for lay in range(l0, l1) for t in range(t0, t1))
    assert covered == [(lay, t) for lay in range(3, 5) for t in range(7, 30)]
    assert all((l1 - l0) * (t1 - t0) * per <= 1_000 for (l0, l1), (t0, t1) in pieces)


def test_ipc_ring_handle_bytes_roundtrip_and_reject_garbage() -> None:
    h = IpcRingHandle("GPU-1234", 1 << 29, b"\x01" * 64, 1 << 29, 512, b"/torch_123_456", 8, None, True)
    assert IpcRingHandle.from_bytes(h.to_bytes()) == h
    h2 = IpcRingHandle("GPU-1234", 1 << 20, b"\x02" * 64, 1 << 21, 0, b"/torch_1_2", 0, b"\x03" * 64, False)
    assert IpcRingHandle.from_bytes(h2.to_bytes()) == h2
    with pytest.raises(ProtocolError):
        IpcRingHandle.from_bytes(h.to_bytes()[:-3])
    with pytest.raises(ProtocolError):
        IpcRingHandle.from_bytes(b"not a handle at all")


def test_config_and_endpoint_validation() -> None:
    with pytest.raises(ValueError, match="peer_timeout_s"):
        TransportConfig(op_timeout_s=30, heartbeat_s=2, peer_timeout_s=20)
    with pytest.raises(ValueError, match="bulk_backend"):
        PairEndpoint("h", 1, "g", "rdma")
