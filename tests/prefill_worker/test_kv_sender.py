"""SenderPool (kv_sender.py) against an in-process fake decode worker (grpc.aio): the pairing check
before the first transfer names every difference, one sender per decode worker, and a decode
worker that refuses or fails the Pair RPC fails the transfer with its reason."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import torch

from common.transport.base import TransferError, TransportConfig
from common.transport.handshake import PairingError
from prefill_worker.kv_sender import SenderPool
from protos import worker_pb2, worker_pb2_grpc

PREFILL = worker_pb2.WorkerInfo(worker_id="prefill-0", role="prefill", model_fingerprint="fp",
                                dtype="float32", page_size=4, num_layers=3, tp_size=1, kv_backend="gloo")


class FakeDecode(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, pair_code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION,
                 pair_details: str = "", **info_changes) -> None:
        self.info = worker_pb2.WorkerInfo()
        self.info.CopyFrom(PREFILL)
        self.info.worker_id, self.info.role = "decode-0", "decode"
        for name, value in info_changes.items():
            setattr(self.info, name, value)
        self.pair_code, self.pair_details = pair_code, pair_details
        self.info_calls = 0
        self.pairs: list[worker_pb2.PairRequest] = []

    async def GetInfo(self, request, context) -> worker_pb2.WorkerInfo:
        self.info_calls += 1
        return self.info

    async def Pair(self, request, context) -> worker_pb2.PairResponse:
        self.pairs.append(request)
        await context.abort(self.pair_code, self.pair_details)


class Done:
    """The pool's on_done: the first (transfer_id, ok, error) it reports."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.calls: list[tuple[int, bool, TransferError | None]] = []

    def __call__(self, transfer_id: int, ok: bool, error: TransferError | None) -> None:
        self.calls.append((transfer_id, ok, error))
        self.event.set()


async def with_decode(decode: FakeDecode, body) -> None:
    server = grpc.aio.server()
    worker_pb2_grpc.add_DecodeWorkerServicer_to_server(decode, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await body(f"127.0.0.1:{port}")
    finally:
        await server.stop(None)


def pool(done: Done | None = None) -> SenderPool:
    return SenderPool(PREFILL, TransportConfig(), None, done or Done(), rpc_timeout=5.0)


def test_an_incompatible_decode_worker_is_refused_naming_each_difference() -> None:
    decode = FakeDecode(page_size=16, num_layers=4)

    async def body(address: str) -> None:
        senders = pool()
        for _ in range(2):  # a refusal is not remembered as checked
            with pytest.raises(PairingError) as err:
                await senders.get(address)
            assert "page_size differs: prefill 4, decode 16" in str(err.value)
            assert "num_layers differs: prefill 3, decode 4" in str(err.value)
        await senders.close()

    asyncio.run(with_decode(decode, body))
    assert decode.info_calls == 2 and decode.pairs == []


def test_a_compatible_decode_worker_gets_one_sender_and_is_checked_once() -> None:
    decode = FakeDecode()

    async def body(address: str) -> None:
        senders = pool()
        first = await senders.get(address)
        assert await senders.get(address) is first
        assert not first.paired  # pairing waits for the first chunk
        await senders.close()

    asyncio.run(with_decode(decode, body))
    assert decode.info_calls == 1 and decode.pairs == []


@pytest.mark.parametrize(("code", "details", "want"), [
    (grpc.StatusCode.FAILED_PRECONDITION, "incompatible prefill/decode pair: dtype differs",
     "incompatible prefill/decode pair: dtype differs"),
    (grpc.StatusCode.UNAVAILABLE, "no rendezvous store",
     ("pairing with decode failed: Pair RPC to decode worker {address} failed: UNAVAILABLE: "
      "no rendezvous store")),
], ids=["refused", "failed"])
def test_a_failed_pairing_fails_the_first_transfer_with_the_reason(code: grpc.StatusCode, details: str,
                                                                   want: str) -> None:
    decode = FakeDecode(pair_code=code, pair_details=details)
    done = Done()

    async def body(address: str) -> None:
        senders = pool(done)
        sender = await senders.get(address)
        kv = torch.zeros(1, 2, 2, 2, 32)
        sender.submit(7, 0, (0, 1), (0, 2), kv, True)
        assert await asyncio.to_thread(done.event.wait, 10.0), "the transfer never finished"
        (tid, ok, error), = done.calls
        # a refusal stays a PairingError (the worker answers FAILED_PRECONDITION); a failed RPC is a TransferError
        wanted = PairingError if code == grpc.StatusCode.FAILED_PRECONDITION else TransferError
        assert (tid, ok) == (7, False) and isinstance(error, wanted)
        assert str(error) == want.format(address=address)
        await senders.close()

    asyncio.run(with_decode(decode, body))
    assert [p.prefill.worker_id for p in decode.pairs] == ["prefill-0"]
