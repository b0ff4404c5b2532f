"""Channels and stubs of the workers, and the two legs of one request.

`WorkerEndpoint` is one worker (address, stub, last known info/load, health flag).
`Dispatch` runs one attempt of a request on a (prefill, decode) pair: the decode leg
(DecodeWorker.Generate, server-stream) and the prefill leg (PrefillWorker.Prefill) are opened
concurrently with the same transfer_id; decode chunks are yielded as they come. If either leg
fails, the other is cancelled and both workers get Abort. If the consumer stops early (client
cancelled, deadline, stop string) both calls are cancelled and both workers get Abort.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from common.serving.grpc_server import client_channel_options
from gateway.errors import GatewayError
from protos import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)
Code = grpc.StatusCode

RATE_EWMA = 0.3  # weight of the newest measurement in a prefill worker's rate
RATE_MIN_TOKENS = 256  # prefill legs computing fewer tokens do not measure the rate
PEER_FAILURE_GRACE_S = 0.25  # how long a failed prefill leg waits for its decode leg to fail too
# Worker statuses after which another (prefill, decode) pair may succeed, before the first token.
RETRYABLE = {Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED, Code.ABORTED, Code.FAILED_PRECONDITION}
# Statuses passed to the client unchanged (the worker's message says what to fix).
PASSTHROUGH = {Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED, Code.ABORTED, Code.FAILED_PRECONDITION,
               Code.OUT_OF_RANGE, Code.DEADLINE_EXCEEDED}


class WorkerEndpoint:
    """One worker: its channel and stub, and what the router last learned about it."""

    def __init__(self, role: str, address: str, max_message_bytes: int) -> None:
        assert role in ("prefill", "decode")
        self.role = role
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=client_channel_options(max_message_bytes))
        stub_cls = worker_pb2_grpc.PrefillWorkerStub if role == "prefill" else worker_pb2_grpc.DecodeWorkerStub
        self.stub = stub_cls(self.channel)
        self.healthy = False
        self.up = asyncio.Event()  # set while healthy (the cache event stream waits on it)
        self.info: worker_pb2.WorkerInfo | None = None
        self.load: worker_pb2.WorkerLoad | None = None
        self.dispatched_since_poll = 0  # requests sent since `load` was read and not finished yet
        self.polls = 0                  # successful load readings so far
        self.inflight = 0               # requests of this gateway currently on the worker
        self.pending_tokens = 0         # prefill: prompt tokens this gateway expects it to compute, not done yet
        self.prefill_rate: float | None = None  # prefill: EWMA of computed prompt tokens per compute second
        # prefill: when the prompt tokens this gateway queued there should all be computed (monotonic
        # seconds), each request's uncached tokens over the rate when it was sent. Unlike
        # pending_tokens it drains while a leg's KV is still being sent, which is not prefill work.
        self.busy_until = 0.0

    def __repr__(self) -> str:
        return f"{self.role} worker {self.address}"

    @property
    def worker_id(self) -> str:
        return self.info.worker_id if self.info is not None else ""

    @property
    def score(self) -> int:
        """Load used for least-loaded routing (lower is better)."""
        l = self.load
        base = (l.running + l.queued + l.waiting_for_kv) if l is not None else 0
        return base + self.dispatched_since_poll

    async def poll(self, timeout: float) -> bool:
        """GetLoad (and GetInfo when unknown or after a recovery). Returns healthy."""
        try:
            if self.info is None or not self.healthy:
                self.info = await self.stub.GetInfo(worker_pb2.InfoRequest(), timeout=timeout)
            self.load = await self.stub.GetLoad(worker_pb2.LoadRequest(), timeout=timeout)
            self.dispatched_since_poll = 0
            self.polls += 1
            if not self.healthy:
                log.info("%s is up (worker_id=%s)", self, self.worker_id)
            self.healthy = True
            self.up.set()
        except grpc.aio.AioRpcError as e:
            if self.healthy:
                log.warning("%s is down: %s %s", self, e.code().name, e.details())
            self.healthy = False
            self.up.clear()
        return self.healthy

    def queue_prefill(self, tokens: int, rate: float, now: float) -> None:
        """`tokens` more prompt tokens to compute here, at `rate` tokens/s, after what is queued."""
        self.busy_until = max(self.busy_until, now) + tokens / rate

    def queued_seconds(self, now: float) -> float:
        """Estimated compute still queued here from this gateway's requests."""
        return max(0.0, self.busy_until - now)

    def observe_prefill(self, computed_tokens: int, seconds: float) -> None:
        """One finished prefill leg: fold its rate into the EWMA (weight RATE_EWMA of the newest).
        Legs that computed fewer than RATE_MIN_TOKENS tokens are not measured: their time is mostly
        fixed per-forward cost, and counting them would make a worker serving cache hits (few
        tokens computed) look slow and push its sessions away."""
        if computed_tokens >= RATE_MIN_TOKENS and seconds > 0:
            rate = computed_tokens / seconds
            self.prefill_rate = rate if self.prefill_rate is None else \
                RATE_EWMA * rate + (1 - RATE_EWMA) * self.prefill_rate

    def mark_failed(self, why: str) -> None:
        if self.healthy:
            log.warning("%s taken out of rotation: %s", self, why)
        self.healthy = False
        self.up.clear()

    async def abort(self, request_id: str, transfer_id: int, timeout: float) -> bool:
        try:
            r = await self.stub.Abort(worker_pb2.AbortRequest(request_id=request_id, transfer_id=transfer_id),
                                      timeout=timeout)
            return r.found
        except grpc.aio.AioRpcError as e:
            log.debug("Abort(%s) on %s failed: %s", request_id, self, e.code().name)
            return False

    async def close(self) -> None:
        await self.channel.close()


class LegError(GatewayError):
    """A worker call failed. `retryable`: another pair may succeed (only before the first token)."""

    def __init__(self, code: grpc.StatusCode, message: str, worker: WorkerEndpoint, retryable: bool,
                 worker_down: bool) -> None:
        super().__init__(code, message)
        self.worker = worker
        self.retryable = retryable
        self.worker_down = worker_down


def leg_error(worker: WorkerEndpoint, e: grpc.aio.AioRpcError, deadline_s: float | None) -> LegError:
    """Map a worker's status to the status the client gets."""
    code, details = e.code(), e.details() or ""
    if code == Code.DEADLINE_EXCEEDED:
        budget = f" ({deadline_s:.1f}s)" if deadline_s is not None else ""
        return LegError(code, f"request deadline{budget} passed while waiting for the {worker}", worker,
                        retryable=False, worker_down=False)
    if code in (Code.UNAVAILABLE, Code.CANCELLED):
        # CANCELLED that we did not ask for: the worker went away (shutdown, crash) mid-call, or the
        # call was torn down around a client's cancellation. Only UNAVAILABLE takes the worker out of
        # rotation; a crashed worker also fails its health poll, a healthy one must not be benched.
        return LegError(Code.UNAVAILABLE, f"{worker} is unavailable: {details or code.name}", worker,
                        retryable=True, worker_down=code == Code.UNAVAILABLE)
    if code in PASSTHROUGH:
        return LegError(code, f"{worker}: {details}", worker, retryable=code in RETRYABLE, worker_down=False)
    return LegError(Code.INTERNAL, f"{worker} failed ({code.name}): {details}", worker,
                    retryable=False, worker_down=False)


@dataclass
class LegRequest:
    request_id: str
    transfer_id: int
    input_ids: list[int]
    sampling: worker_pb2.WorkerSampling
    deadline: float | None  # time.monotonic() deadline, None = none
    uncached_tokens: int = 0  # the router's estimate of the prompt tokens the prefill worker computes
    cache_salt: str = ""  # the request's prefix-cache salt (calls.PromptCache)


class Dispatch:
    """One attempt of one request on one (prefill, decode) pair; with no prefill worker (local
    prefill) only the decode leg runs, with DecodeRequest.local_prefill set."""

    def __init__(self, prefill: WorkerEndpoint | None, decode: WorkerEndpoint, req: LegRequest,
                 background: set[asyncio.Task], abort_timeout: float) -> None:
        self.prefill = prefill
        self.decode = decode
        self.req = req
        self.prefill_result: worker_pb2.PrefillResult | None = None
        self.chunks_received = 0
        self._background = background
        self._abort_timeout = abort_timeout
        self._finished = False

    def _timeout(self) -> tuple[float | None, float]:
        if self.req.deadline is None:
            return None, 0.0
        remaining = max(self.req.deadline - time.monotonic(), 0.001)
        return remaining, time.time() + remaining

    async def chunks(self) -> AsyncIterator[worker_pb2.DecodeChunk]:
        r = self.req
        timeout, deadline_unix = self._timeout()
        local = self.prefill is None
        decode_call = self.decode.stub.Generate(worker_pb2.DecodeRequest(
            request_id=r.request_id, transfer_id=r.transfer_id, input_ids=r.input_ids, sampling=r.sampling,
            prefill_worker_id="" if local else self.prefill.worker_id, deadline_unix=deadline_unix,
            local_prefill=local, cache_salt=r.cache_salt), timeout=timeout)
        prefill_call = None
        if local:  # no prefill leg: its "result" is what the decode worker already held
            prefill_task: asyncio.Future = asyncio.get_running_loop().create_future()
            prefill_task.set_result(worker_pb2.PrefillResult(cached_tokens=len(r.input_ids) - r.uncached_tokens))
        else:
            prefill_call = self.prefill.stub.Prefill(worker_pb2.PrefillRequest(
                request_id=r.request_id, transfer_id=r.transfer_id, input_ids=r.input_ids, sampling=r.sampling,
                decode_address=self.decode.address, decode_worker_id=self.decode.worker_id,
                deadline_unix=deadline_unix, cache_salt=r.cache_salt), timeout=timeout)
            prefill_task = asyncio.ensure_future(prefill_call)
            prefill_task.add_done_callback(_consume_exception)
            prefill_task.add_done_callback(self._prefill_leg_done)
            self.prefill.pending_tokens += r.uncached_tokens
        read_task: asyncio.Future | None = None
        legs = [w for w in (self.prefill, self.decode) if w is not None]
        reading = {id(w): w.polls for w in legs}  # a request the next reading sees is in that reading
        for w in legs:
            w.inflight += 1
            w.dispatched_since_poll += 1
        try:
            while True:
                read_task = asyncio.ensure_future(decode_call.read())
                if not prefill_task.done():
                    await asyncio.wait({read_task, prefill_task}, return_when=asyncio.FIRST_COMPLETED)
                    if prefill_task.done():
                        await self._blame_a_dead_decode(prefill_task, read_task, timeout)
                        self._take_prefill_result(prefill_task, timeout)  # raises if the prefill leg failed
                try:
                    msg = await read_task
                except grpc.aio.AioRpcError as e:
                    raise leg_error(self.decode, e, timeout) from None
                finally:
                    read_task = None
                if msg is grpc.aio.EOF:
                    break
                self.chunks_received += 1
                if msg.HasField("finish"):
                    self._finished = True
                yield msg
            if not prefill_task.done():  # decode finished first; the prefill result only adds usage
                await asyncio.wait({prefill_task}, timeout=self._abort_timeout)
            if prefill_task.done() and self.prefill_result is None:
                try:
                    self._take_prefill_result(prefill_task, timeout)
                except LegError as e:  # the answer is complete; a late prefill error does not change it
                    log.warning("request %s: prefill leg failed after decode finished: %s", r.request_id, e)
            if not self._finished:
                raise LegError(Code.INTERNAL, f"{self.decode} ended the stream without a finish", self.decode,
                               retryable=False, worker_down=False)
        finally:
            if read_task is not None and not read_task.done():
                read_task.cancel()
            if not self._finished:  # failed, or the consumer stopped early: free both legs
                decode_call.cancel()
                if prefill_call is not None:
                    prefill_call.cancel()
                prefill_task.cancel()
                self._abort(*legs)
            elif not prefill_task.done():
                prefill_call.cancel()
                prefill_task.cancel()
                self._abort(self.prefill)
            for w in legs:
                w.inflight -= 1
                if w.polls == reading[id(w)]:  # ended before any reading saw it: no longer load
                    w.dispatched_since_poll = max(0, w.dispatched_since_poll - 1)

    def _prefill_leg_done(self, task: asyncio.Future) -> None:
        """The prefill worker no longer has this prompt queued; a success measures its rate."""
        r, worker = self.req, self.prefill
        worker.pending_tokens -= r.uncached_tokens
        if worker.pending_tokens <= 0:  # nothing of this gateway's left there: whatever was estimated, it is idle
            worker.busy_until = min(worker.busy_until, time.monotonic())
        if not task.cancelled() and task.exception() is None:
            result = task.result()
            worker.observe_prefill(len(r.input_ids) - result.cached_tokens, result.compute_seconds)

    async def _blame_a_dead_decode(self, prefill_task: asyncio.Future, read_task: asyncio.Future,
                                   timeout: float | None) -> None:
        """A decode worker that dies also fails the prefill leg (it cannot reach its peer: UNAVAILABLE
        or ABORTED from a healthy prefill worker). Before blaming the prefill worker -- benching it,
        and retrying without it -- give the decode leg a moment to fail on its own; if it does with
        UNAVAILABLE, the decode worker is the one that is down."""
        error = prefill_task.exception() if not prefill_task.cancelled() else None
        if not isinstance(error, grpc.aio.AioRpcError) or error.code() not in (Code.UNAVAILABLE, Code.ABORTED):
            return
        await asyncio.wait({read_task}, timeout=PEER_FAILURE_GRACE_S)
        if read_task.done() and not read_task.cancelled():
            peer = read_task.exception()
            if isinstance(peer, grpc.aio.AioRpcError) and peer.code() == Code.UNAVAILABLE:
                raise leg_error(self.decode, peer, timeout) from None

    def _take_prefill_result(self, task: asyncio.Future, timeout: float | None) -> None:
        try:
            self.prefill_result = task.result()
        except grpc.aio.AioRpcError as e:
            raise leg_error(self.prefill, e, timeout) from None

    def _abort(self, *workers: WorkerEndpoint) -> None:
        """Send Abort in the background (survives the caller's cancellation)."""
        for w in workers:
            t = asyncio.get_running_loop().create_task(
                w.abort(self.req.request_id, self.req.transfer_id, self._abort_timeout))
            self._background.add(t)
            t.add_done_callback(self._background.discard)


def _consume_exception(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # retrieved here so an abandoned leg never logs "exception was never retrieved"
