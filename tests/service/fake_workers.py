"""Fake prefill / decode workers: real grpc.aio servers of worker.proto that play a script.

The decode worker waits for the prefill of the same transfer_id (an in-process stand-in for the
KV hand-off), then streams the scripted chunks; the prefill returns the first scripted token.
Both record every request and every Abort. Errors, delays and death are scripted.

Run as a process (for the "worker dies" test):
    python tests/service/fake_workers.py decode '<Script JSON>'   -> prints "PORT <n>" and serves
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common.serving.cache_events import CacheEvents
from common.serving.grpc_server import make_server
from common.serving.page_hash import page_key, root_key
from protos import worker_pb2, worker_pb2_grpc


@dataclass
class Script:
    chunks: list[list[int]] = field(default_factory=list)  # token ids per DecodeChunk
    finish_reason: str = "stop"
    finish_token: int | None = None     # matched stop token (should be the last scripted id)
    chunk_delay: float = 0.0            # seconds before each chunk
    decode_error: str | None = None     # status code name raised before the first chunk
    decode_error_delay: float = 0.0     # seconds before that error
    decode_error_message: str = ""      # its details ("" = a generic scripted message)
    error_after: int | None = None      # raise decode_error after this many chunks instead
    die_after: int | None = None        # os._exit after this many chunks (process mode)
    prefill_error: str | None = None    # status code name raised by Prefill
    prefill_delay: float = 0.0
    cached_tokens: int = 0
    spec_steps_per_chunk: int = 0       # verify steps reported per chunk (0 = no speculation)
    logprobs: bool = False
    grammar_reports: bool = True        # report a request's grammar as applied (a worker that drops it: False)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class Handoff:
    """transfer_id -> event set by the prefill leg (stands in for the KV transfer)."""

    def __init__(self) -> None:
        self._events: dict[int, asyncio.Event] = {}

    def event(self, transfer_id: int) -> asyncio.Event:
        return self._events.setdefault(transfer_id, asyncio.Event())


class _Recorder:
    def __init__(self, worker_id: str, role: str) -> None:
        self.worker_id = worker_id
        self.role = role
        self.requests: list = []
        self.aborts: list[worker_pb2.AbortRequest] = []
        self.aborted: set[int] = set()
        self.load = worker_pb2.WorkerLoad(total_pages=100, free_pages=100)
        self.abort_event = asyncio.Event()
        self.cache_events: CacheEvents | None = None  # set: WatchCache streams it (else UNIMPLEMENTED)
        self.flushes = 0

    async def WatchCache(self, request, context):
        if self.cache_events is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no cache events")
        async for event in self.cache_events.stream():
            yield event

    async def FlushCache(self, request, context) -> worker_pb2.FlushCacheResponse:
        self.flushes += 1
        if self.cache_events is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no prefix cache")
        self.cache_events.listener(_Change(reset=True))
        return worker_pb2.FlushCacheResponse(pages_freed=3)

    async def Abort(self, request: worker_pb2.AbortRequest, context) -> worker_pb2.AbortResponse:
        self.aborts.append(request)
        self.aborted.add(request.transfer_id)
        self.abort_event.set()
        return worker_pb2.AbortResponse(found=True)

    async def GetInfo(self, request, context) -> worker_pb2.WorkerInfo:
        return worker_pb2.WorkerInfo(worker_id=self.worker_id, role=self.role, model_fingerprint="fake",
                                     page_size=16, num_layers=4, tp_size=1, kv_backend="loopback",
                                     spec=worker_pb2.SpecLayout(algorithm="EAGLE", num_steps=3, eagle_topk=1,
                                                                num_draft_tokens=4, draft_kv=True))

    async def GetLoad(self, request, context) -> worker_pb2.WorkerLoad:
        return self.load


FAKE_NAMESPACE = "fake-model/bf16/16/4"


@dataclass(frozen=True)
class _Change:
    """What a worker's PrefixCache hands its CacheEvents (common/kvcache/prefix_index.py IndexChange)."""

    stored: tuple[bytes, ...] = ()
    removed: tuple[bytes, ...] = ()
    reset: bool = False


def store_prompt(events: CacheEvents, ids: list[int]) -> list[bytes]:
    """What a real worker's cache reports after computing `ids`: the keys of its full pages."""
    keys, parent = [], root_key(events.namespace)
    for i in range(len(ids) // events.page_size):
        parent = page_key(parent, ids[i * events.page_size:(i + 1) * events.page_size])
        keys.append(parent)
    events.listener(_Change(stored=tuple(keys)))
    return keys


def _code(name: str) -> grpc.StatusCode:
    return grpc.StatusCode[name]


class FakePrefill(_Recorder, worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, worker_id: str, script_for: Callable[[worker_pb2.PrefillRequest], Script],
                 handoff: Handoff) -> None:
        super().__init__(worker_id, "prefill")
        self.script_for = script_for
        self.handoff = handoff

    async def Prefill(self, request: worker_pb2.PrefillRequest, context) -> worker_pb2.PrefillResult:
        self.requests.append(request)
        s = self.script_for(request)
        await asyncio.sleep(s.prefill_delay)
        if s.prefill_error:
            await context.abort(_code(s.prefill_error), f"scripted prefill failure on {self.worker_id}")
        self.handoff.event(request.transfer_id).set()
        if self.cache_events is not None:
            store_prompt(self.cache_events, list(request.input_ids))
        first = s.chunks[0][0] if s.chunks and s.chunks[0] else 0
        return worker_pb2.PrefillResult(
            first_token=first, first_logprob=-0.5, kv_bytes=1024, cached_tokens=s.cached_tokens,
            grammar_applied=s.grammar_reports and request.sampling.HasField("grammar"))


class FakeDecode(_Recorder, worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, worker_id: str, script_for: Callable[[worker_pb2.DecodeRequest], Script],
                 handoff: Handoff | None, kv_timeout: float = 5.0) -> None:
        super().__init__(worker_id, "decode")
        self.script_for = script_for
        self.handoff = handoff
        self.kv_timeout = kv_timeout

    async def Generate(self, request: worker_pb2.DecodeRequest, context):
        self.requests.append(request)
        s = self.script_for(request)
        if s.decode_error and s.error_after is None:
            await asyncio.sleep(s.decode_error_delay)
            await context.abort(_code(s.decode_error),
                                s.decode_error_message or f"scripted decode failure on {self.worker_id}")
        if self.handoff is not None and not request.local_prefill:
            try:
                await asyncio.wait_for(self.handoff.event(request.transfer_id).wait(), self.kv_timeout)
            except TimeoutError:
                await context.abort(grpc.StatusCode.ABORTED, "KV never arrived")
        done = 0
        steps = 0
        for i, ids in enumerate(s.chunks):
            if request.transfer_id in self.aborted:
                return
            if s.error_after is not None and i == s.error_after:
                await context.abort(_code(s.decode_error or "INTERNAL"), "scripted decode failure")
            if s.die_after is not None and i == s.die_after:
                os._exit(17)
            await asyncio.sleep(s.chunk_delay)
            done += len(ids)
            steps += s.spec_steps_per_chunk
            chunk = worker_pb2.DecodeChunk(token_ids=ids, completion_tokens=done, spec_verify_steps=steps,
                                           spec_accepted_drafts=max(done - 1 - steps, 0) if steps else 0)
            if s.grammar_reports and request.sampling.HasField("grammar"):
                chunk.grammar_tokens = done  # the scripted tokens stand for tokens sampled under the mask
            if s.logprobs:
                for t in ids:
                    chunk.logprobs.add(token_id=t, logprob=-0.25, top_ids=[t, t + 1], top_logprobs=[-0.25, -2.0])
            if i == len(s.chunks) - 1:
                chunk.finish.reason = s.finish_reason
                if s.finish_token is not None:
                    chunk.finish.token_id = s.finish_token
            yield chunk


@dataclass
class FakeCluster:
    """In-process fake workers on loopback; addresses for GatewayConfig."""
    prefills: list[FakePrefill]
    decodes: list[FakeDecode]
    servers: list[grpc.aio.Server]
    prefill_addrs: list[str]
    decode_addrs: list[str]

    @classmethod
    async def start(cls, script_for: Callable[[object], Script], n_prefill: int = 1,
                    n_decode: int = 1) -> FakeCluster:
        handoff = Handoff()
        prefills = [FakePrefill(f"prefill-{i}", script_for, handoff) for i in range(n_prefill)]
        decodes = [FakeDecode(f"decode-{i}", script_for, handoff) for i in range(n_decode)]
        servers, p_addrs, d_addrs = [], [], []
        for w in [*prefills, *decodes]:
            server = make_server()  # as the real workers: accepts the gateway's keepalive pings
            if isinstance(w, FakePrefill):
                worker_pb2_grpc.add_PrefillWorkerServicer_to_server(w, server)
            else:
                worker_pb2_grpc.add_DecodeWorkerServicer_to_server(w, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            servers.append(server)
            (p_addrs if isinstance(w, FakePrefill) else d_addrs).append(f"127.0.0.1:{port}")
        return cls(prefills, decodes, servers, p_addrs, d_addrs)

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop(None) for s in self.servers))


async def _serve_process(role: str, script: Script) -> None:
    server = make_server()
    if role == "decode":
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(FakeDecode("decode-proc", lambda r: script, None), server)
    else:
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(FakePrefill("prefill-proc", lambda r: script, Handoff()),
                                                            server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"PORT {port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(_serve_process(sys.argv[1], Script(**json.loads(sys.argv[2]))))
