"""CUDA IPC KV transport between two processes on ONE GPU (NCCL cannot pair them).

Air-shaped KV (47 layers x 2 x tokens x 8 x 128 bf16) goes prefill -> decode through KVSender /
KVReceiver over a deliberately small staging ring (so it wraps many times); every byte is
checked, and GB/s is printed (benchmarks/serving/bench_transport.py measures it properly).
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any

import pytest
import torch

from common.transport.base import TransportConfig
from tests.gpu.air_kv import send_air_kv

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ.setdefault(_k, _v)


def test_cuda_ipc_same_gpu_payload_equal_and_bandwidth() -> None:
    cfg = TransportConfig(bind_host="127.0.0.1", ipc_ring_bytes=256 << 20, op_timeout_s=60, peer_timeout_s=120)
    rows = send_air_kv("cuda_ipc", 0, 0, (1024, 8192, 32768), cfg)
    for r in rows:
        print(f"cuda_ipc {r.tokens:6d} tokens {r.nbytes / 2**20:9.1f} MiB  {r.nbytes / r.seconds / 1e9:7.1f} GB/s")
    assert [r.tokens for r in rows] == [1024, 1024, 8192, 8192, 32768, 32768]  # two transfers each, one pair
    assert all(r.ok and r.equal for r in rows), rows


# ---------------------------------------------------------------------------- failure and re-pair
CFG = TransportConfig(op_timeout_s=5.0, peer_timeout_s=10.0, heartbeat_s=0.5, transfer_timeout_s=30.0,
                      pair_timeout_s=60.0, reserve_grace_s=1.0, ipc_ring_bytes=3 << 20, bind_host="127.0.0.1")
SHAPE = (4, 2, 256, 8, 128)  # 4 layers x 256 tokens of Air-shaped bf16 KV: 1 MiB per layer


def _pattern(device: str) -> torch.Tensor:
    n = 1
    for d in SHAPE:
        n *= d
    return torch.arange(n, device=device).remainder(1021).to(torch.bfloat16).view(SHAPE)


def _prefill(requests: Any, replies: Any, out: Any, tid: int, die_on_second_chunk: bool) -> None:
    import signal

    from common.transport import nccl
    from common.transport.sender import KVSender

    torch.cuda.set_device(0)
    if die_on_second_chunk:  # killed after its first chunk, with the ring mapped
        stage, calls = nccl.IpcSenderBulk.stage, []

        def dying_stage(self: Any, data: torch.Tensor, deadline: float) -> Any:
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return stage(self, data, deadline)

        nccl.IpcSenderBulk.stage = dying_stage

    def pair_fn() -> Any:
        requests.put("p0")
        return replies.get(timeout=60)

    done = threading.Event()
    result: list[Any] = []
    sender = KVSender(pair_fn, lambda t, ok, err: (result.append((t, ok)), done.set()), CFG,
                      device=torch.device("cuda", 0))
    kv = _pattern("cuda:0")
    for seq, l0 in enumerate(range(SHAPE[0])):  # one 1 MiB chunk per layer; the 3 MiB ring wraps
        sender.submit(tid, seq, (l0, l0 + 1), (0, SHAPE[2]), kv[l0:l0 + 1], l0 == SHAPE[0] - 1, aux=None)
    done.wait(60)
    out.put(result)
    sender.close()


class _Sink:
    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.cv = threading.Condition()
        self.dest = torch.zeros(SHAPE, dtype=torch.bfloat16, device="cuda:0")

    def on_chunk(self, tid: int, seq: int, layers: tuple[int, int], tokens: tuple[int, int],
                 heads: tuple[int, int], payload: torch.Tensor):
        self.dest[layers[0]:layers[1], :, tokens[0]:tokens[1]].copy_(payload)
        self._add(("chunk", tid, seq))

    def on_last(self, tid: int, aux: bytes) -> None:
        self._add(("last", tid))

    def on_failed(self, tid: int, reason: str) -> None:
        self._add(("failed", tid, reason))

    def _add(self, e: tuple) -> None:
        with self.cv:
            self.events.append(e)
            self.cv.notify_all()

    def terminal(self, tid: int, timeout: float) -> tuple:
        with self.cv:
            assert self.cv.wait_for(lambda: any(e[1] == tid and e[0] != "chunk" for e in self.events), timeout)
            return next(e for e in self.events if e[1] == tid and e[0] != "chunk")


def test_cuda_ipc_prefill_killed_mid_transfer_then_repair_reuses_the_ring() -> None:
    import multiprocessing as mp

    from common.transport.receiver import PairAcceptor, ReservationTable

    torch.cuda.set_device(0)
    sink = _Sink()
    table = ReservationTable(sink, CFG.transfer_timeout_s)
    acceptor = PairAcceptor(table, CFG, advertise_host="127.0.0.1", device=torch.device("cuda", 0))
    ctx = mp.get_context("spawn")
    requests, replies, out = ctx.Queue(), ctx.Queue(), ctx.Queue()
    stop = threading.Event()

    def serve() -> None:  # stand-in for the Pair RPC
        while not stop.is_set():
            try:
                peer = requests.get(timeout=0.1)
            except queue.Empty:
                continue
            replies.put(acceptor.accept(peer, "cuda_ipc"))

    threading.Thread(target=serve, daemon=True).start()
    try:
        table.reserve(1)
        dying = ctx.Process(target=_prefill, args=(requests, replies, out, 1, True))
        dying.start()
        ev = sink.terminal(1, timeout=90)
        assert ev[0] == "failed", ev
        assert [e[0] for e in sink.events if e[1] == 1] == ["chunk", "failed"]
        dying.join(10)

        table.reserve(2)
        sink.dest.zero_()
        torch.cuda.synchronize()
        good = ctx.Process(target=_prefill, args=(requests, replies, out, 2, False))
        good.start()
        assert sink.terminal(2, timeout=90) == ("last", 2)
        assert out.get(timeout=30) == [(2, True)]
        good.join(30)
        assert torch.equal(sink.dest, _pattern("cuda:0"))  # 4 chunks through a 3 MiB ring: wrapped
        assert len(acceptor._rings) == 1  # the same peer kept its ring across the re-pair
    finally:
        stop.set()
        acceptor.close(5)
        table.close()
