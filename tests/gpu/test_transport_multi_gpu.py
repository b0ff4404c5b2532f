"""NCCL KV transport between GPU 0 (prefill process) and GPU 1 (decode process).

1. Payload: Air-shaped KV for 1K / 8K / 32K tokens in layer groups, two transfers each over one
   pair, every byte checked, GB/s printed (benchmarks/serving/bench_transport.py measures it
   against the raw GPU-to-GPU copy).
2. Failure: a prefill that sends a header and never the NCCL payload. Decode must fail the
   transfer within op_timeout_s, abort the NCCL group (no hang, no watchdog kill), end the
   receiver, and then pair again with a fresh prefill process over a new NCCL group.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from typing import Any

import pytest
import torch

from common.transport.base import TransportConfig
from tests.gpu.air_kv import send_air_kv

pytestmark = [pytest.mark.multi_gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]

for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ.setdefault(_k, _v)

CFG = TransportConfig(op_timeout_s=3.0, peer_timeout_s=8.0, heartbeat_s=0.5, transfer_timeout_s=30.0,
                      reserve_grace_s=1.0, pair_timeout_s=60.0, bind_host="127.0.0.1")


def test_nccl_gpu0_to_gpu1_payload_equal_and_bandwidth() -> None:
    rows = send_air_kv("nccl", 0, 1, (1024, 8192, 32768), TransportConfig(bind_host="127.0.0.1"))
    for r in rows:
        print(f"nccl {r.tokens:6d} tokens {r.nbytes / 2**20:9.1f} MiB  {r.nbytes / r.seconds / 1e9:7.1f} GB/s")
    assert [r.tokens for r in rows] == [1024, 1024, 8192, 8192, 32768, 32768]  # two transfers each, one pair
    assert all(r.ok and r.equal for r in rows), rows


def _stalling_prefill(endpoint: Any) -> None:
    """Rank 0 on GPU 0: header out, payload never (NCCL recv on decode waits for nothing)."""
    from common.transport.pair import PREFILL_RANK, open_pair
    from common.transport.wire import ChunkHeader

    torch.cuda.set_device(0)
    pair = open_pair(endpoint, PREFILL_RANK, CFG, torch.device("cuda", 0))
    pair.send_header(ChunkHeader(1, 0, (0, 2), (0, 64), False, 0, torch.bfloat16, 8, 128), time.monotonic() + 10)
    time.sleep(120)


def _good_prefill(endpoint: Any, out: Any) -> None:
    from common.transport.sender import KVSender

    torch.cuda.set_device(0)
    done = threading.Event()
    result: list[Any] = []
    sender = KVSender(lambda: endpoint, lambda t, ok, err: (result.append((t, ok, repr(err))), done.set()), CFG,
                      device=torch.device("cuda", 0))
    kv = torch.arange(3 * 2 * 64 * 8 * 128, device="cuda:0").remainder(977).to(torch.bfloat16).view(3, 2, 64, 8, 128)
    sender.submit(2, 0, (0, 3), (0, 64), kv, True, aux=b"ok")
    done.wait(60)
    out.put(result)
    sender.close()


class _Sink:
    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.cv = threading.Condition()
        self.dest = torch.zeros(3, 2, 64, 8, 128, dtype=torch.bfloat16, device="cuda:1")

    def _add(self, e: tuple) -> None:
        with self.cv:
            self.events.append(e)
            self.cv.notify_all()

    def on_chunk(self, tid: int, seq: int, layers: tuple[int, int], tokens: tuple[int, int],
                 heads: tuple[int, int], payload: torch.Tensor):
        if tid == 2:
            self.dest[layers[0]:layers[1], :, tokens[0]:tokens[1]].copy_(payload)
        self._add(("chunk", tid, seq))

    def on_last(self, tid: int, aux: bytes) -> None:
        self._add(("last", tid, aux))

    def on_failed(self, tid: int, reason: str) -> None:
        self._add(("failed", tid, reason))

    def wait(self, tid: int, timeout: float) -> tuple:
        with self.cv:
            assert self.cv.wait_for(lambda: any(e[1] == tid and e[0] != "chunk" for e in self.events), timeout)
            return next(e for e in self.events if e[1] == tid and e[0] != "chunk")


def test_nccl_payload_stall_aborts_the_group_and_a_new_pair_works() -> None:
    from common.transport.receiver import PairAcceptor, ReservationTable

    torch.cuda.set_device(1)
    sink = _Sink()
    table = ReservationTable(sink, CFG.transfer_timeout_s)
    acceptor = PairAcceptor(table, CFG, advertise_host="127.0.0.1", device=torch.device("cuda", 1))
    ctx = mp.get_context("spawn")
    try:
        table.reserve(1)
        staller = ctx.Process(target=_stalling_prefill, args=(acceptor.accept("p0", "nccl"),))
        staller.start()
        receiver = acceptor.receiver("p0")
        t0 = time.monotonic()
        ev = sink.wait(1, timeout=CFG.pair_timeout_s + CFG.op_timeout_s + 10)
        assert ev[0] == "failed" and "NCCL payload receive" in ev[2], ev
        assert receiver.closed.wait(10) and not receiver.alive
        print(f"stalled NCCL receive failed and the group was aborted after {time.monotonic() - t0:.1f} s")
        staller.kill()
        staller.join()

        table.reserve(2)
        out = ctx.Queue()
        good = ctx.Process(target=_good_prefill, args=(acceptor.accept("p0", "nccl"), out))
        good.start()
        assert sink.wait(2, timeout=90) == ("last", 2, b"ok")
        assert out.get(timeout=30) == [(2, True, "None")]
        good.join(30)
        expect = torch.arange(3 * 2 * 64 * 8 * 128, device="cuda:1").remainder(977).to(torch.bfloat16)
        assert torch.equal(sink.dest.view(-1), expect)
    finally:
        acceptor.close(5)
        table.close()
