"""GLM-4.5-Air-shaped KV sent through the real transport by a spawned prefill process, every byte
checked on the decode side (in the test's process): the payload checks of the GPU transport tests.

The prefill process sends each transfer as layer groups of LAYER_GROUP layers (one chunk each) over
one pair, so later transfers reuse the pair the first one opened; the decode side is a
ReservationTable + PairAcceptor whose sink copies each chunk into place, as the worker's scatter does.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from common.transport.base import PairEndpoint, TransportConfig

AIR_LAYERS, AIR_KV_HEADS, AIR_HEAD_DIM = 46 + 1, 8, 128  # 46 layers + the MTP layer
LAYER_GROUP = 4


@dataclass(frozen=True)
class Transfer:
    tokens: int
    nbytes: int
    seconds: float  # first submit -> on_done on the prefill side
    ok: bool  # both sides finished it
    equal: bool  # the decode side's copy equals what was sent, byte for byte


def layer_kv(layer: int, tokens: int, seed: int, device: torch.device) -> torch.Tensor:
    """Deterministic bytes of one layer's K/V, [2, tokens, 8, 128] bf16 (compared as bytes)."""
    n = 2 * tokens * AIR_KV_HEADS * AIR_HEAD_DIM * 2
    idx = torch.arange(n, dtype=torch.int64, device=device) + layer * n
    return ((idx * 131 + seed) % 251).to(torch.uint8).view(torch.bfloat16).view(2, tokens, AIR_KV_HEADS, AIR_HEAD_DIM)


def air_kv(tokens: int, seed: int, device: torch.device) -> torch.Tensor:
    """[47, 2, tokens, 8, 128] bf16: every layer's layer_kv."""
    kv = torch.empty(AIR_LAYERS, 2, tokens, AIR_KV_HEADS, AIR_HEAD_DIM, dtype=torch.bfloat16, device=device)
    for layer in range(AIR_LAYERS):
        kv[layer] = layer_kv(layer, tokens, seed, device)
    return kv


def equals_air_kv(kv: torch.Tensor, seed: int) -> bool:
    """kv is air_kv(tokens, seed) byte for byte (checked layer by layer)."""
    return all(torch.equal(kv[layer].view(torch.uint8), layer_kv(layer, kv.shape[2], seed, kv.device).view(torch.uint8))
               for layer in range(AIR_LAYERS))


class _Sink:
    """Copies chunks into a preallocated destination per transfer; records the terminal event."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.dest, self.done = device, {}, {}
        self.cv = threading.Condition()

    def expect(self, tid: int, tokens: int) -> None:
        self.dest[tid] = torch.zeros(AIR_LAYERS, 2, tokens, AIR_KV_HEADS, AIR_HEAD_DIM, dtype=torch.bfloat16,
                                     device=self.device)

    def on_chunk(self, tid: int, seq: int, layers: tuple[int, int], tokens: tuple[int, int],
                 heads: tuple[int, int], payload: torch.Tensor) -> None:
        self.dest[tid][layers[0]:layers[1], :, tokens[0]:tokens[1]].copy_(payload)

    def on_last(self, tid: int, aux: bytes) -> None:
        self._finish(tid, True)

    def on_failed(self, tid: int, reason: str) -> None:
        self._finish(tid, False)

    def _finish(self, tid: int, ok: bool) -> None:
        with self.cv:
            self.done[tid] = ok
            self.cv.notify_all()

    def wait(self, tid: int, timeout: float) -> bool:
        with self.cv:
            return self.cv.wait_for(lambda: tid in self.done, timeout) and self.done[tid]


def _prefill(endpoint: PairEndpoint, cfg: TransportConfig, device: int, jobs: list[tuple[int, int, int]],
             go: Any, out: Any) -> None:
    """Spawned: one KVSender on cuda:device; per job (tid, tokens, seed), once the decode side has
    reserved it (a token on `go`), the KV in layer groups; (tid, ok, seconds) to `out`."""
    from common.transport.sender import KVSender

    dev = _device(device)
    done: dict[int, threading.Event] = {tid: threading.Event() for tid, _, _ in jobs}
    ok: dict[int, bool] = {}

    def on_done(tid: int, success: bool, err: Any) -> None:
        ok[tid] = success
        done[tid].set()

    sender = KVSender(lambda: endpoint, on_done, cfg, device=dev if dev.type == "cuda" else None)
    for tid, tokens, seed in jobs:
        kv = air_kv(tokens, seed, dev)
        go.get(timeout=cfg.pair_timeout_s)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        groups = list(range(0, AIR_LAYERS, LAYER_GROUP))
        for seq, l0 in enumerate(groups):
            l1 = min(l0 + LAYER_GROUP, AIR_LAYERS)
            sender.submit(tid, seq, (l0, l1), (0, tokens), kv[l0:l1], seq == len(groups) - 1, aux=None)
        done[tid].wait(cfg.op_timeout_s * len(groups) + cfg.pair_timeout_s)
        out.put((tid, ok.get(tid, False), time.perf_counter() - t0))
        del kv
    sender.close()


def send_air_kv(backend: str, prefill_device: int, decode_device: int, token_counts: tuple[int, ...],
                cfg: TransportConfig, iters: int = 2) -> list[Transfer]:
    """iters transfers per token count, prefill on cuda:prefill_device -> decode on cuda:decode_device
    (-1: the CPU, over gloo)."""
    from common.transport.receiver import PairAcceptor, ReservationTable

    dev = _device(decode_device)
    sink = _Sink(dev)
    table = ReservationTable(sink, cfg.transfer_timeout_s)
    acceptor = PairAcceptor(table, cfg, advertise_host="127.0.0.1", device=dev if dev.type == "cuda" else None)
    jobs = [(1000 + 10 * i + j, tokens, 7 * i + j) for i, tokens in enumerate(token_counts) for j in range(iters)]
    ctx = mp.get_context("spawn")
    go, out = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_prefill, args=(acceptor.accept("prefill-0", backend), cfg, prefill_device, jobs, go, out))
    proc.start()
    results = []
    try:
        for tid, tokens, seed in jobs:
            sink.expect(tid, tokens)
            table.reserve(tid)
            go.put(tid)
            got_tid, sent, secs = _result(out, proc, cfg.pair_timeout_s + cfg.transfer_timeout_s)
            assert got_tid == tid, (got_tid, tid)
            received = sink.wait(tid, timeout=cfg.transfer_timeout_s)
            equal = received and equals_air_kv(sink.dest.pop(tid), seed)
            results.append(Transfer(tokens, tokens * AIR_LAYERS * 2 * AIR_KV_HEADS * AIR_HEAD_DIM * 2, secs,
                                    sent and received, equal))
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
        acceptor.close(5)
        table.close()
    return results


def _device(index: int) -> torch.device:
    if index < 0:
        return torch.device("cpu")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _result(out: Any, proc: Any, timeout_s: float) -> tuple[int, bool, float]:
    """The prefill process's next (tid, ok, seconds); fails at once if the process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return out.get(timeout=1.0)
        except queue.Empty:
            assert proc.is_alive() or not out.empty(), f"prefill process ended (exit code {proc.exitcode})"
    raise AssertionError(f"no transfer result within {timeout_s:.0f} s")
