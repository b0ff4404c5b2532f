"""PrefillWorker gRPC servicer: validate, wait for decode's reservation, run, report."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc

from common.grammar.state import grammar_state_for
from common.runtime.step_plan import TPBroken
from common.serving.cache_events import flush_cache, watch_cache
from common.serving.sampling_params import SamplingParams
from common.transport.base import TransferError
from common.transport.handshake import PairingError
from prefill_worker.scheduler import PrefillJob
from protos import worker_pb2, worker_pb2_grpc

if TYPE_CHECKING:
    from prefill_worker.server import PrefillWorkerApp

log = logging.getLogger(__name__)


def status_of(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, TPBroken):  # the worker is going away: retry elsewhere
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, PairingError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(error, TransferError):
        return grpc.StatusCode.ABORTED
    if isinstance(error, OverflowError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.INTERNAL


def decode_held(reply: worker_pb2.ReserveReply, prompt_len: int, page_size: int) -> int:
    """The leading prompt tokens whose KV the decode worker holds (ReserveReply.cached_tokens): whole
    pages short of the whole prompt, else nothing is skipped (a reply this side cannot honour safely
    is ignored, and the decode side drops what it already holds)."""
    n = reply.cached_tokens
    if n % page_size or n >= prompt_len:
        log.warning("decode worker reported %d cached tokens of a %d-token prompt (page %d): ignored",
                    n, prompt_len, page_size)
        return 0
    return n


class PrefillServicer(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, app: PrefillWorkerApp) -> None:
        self.app = app

    async def Prefill(self, request: worker_pb2.PrefillRequest,
                      context: grpc.aio.ServicerContext) -> worker_pb2.PrefillResult:
        app = self.app
        if app.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "prefill worker is draining; retry on another")
        problem = self._validate(request)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        try:
            params = SamplingParams.from_wire(request.sampling, vocab_size=app.config.vocab_size)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:  # compiled on the grammar pool: neither the event loop nor the engine waits for it
            grammar = await grammar_state_for(app.grammar, params, app.think_end_id)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            sender = await app.senders.get(request.decode_address)
        except PairingError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except grpc.aio.AioRpcError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"decode worker {request.decode_address} unreachable: {e.details()}")
        try:  # docs/disaggregation.md rule 1: no KV byte before decode holds the pages
            reserved = await app.senders.stub(request.decode_address).AwaitReserved(
                worker_pb2.ReserveQuery(transfer_id=request.transfer_id, timeout_seconds=app.cfg.transfer_timeout),
                timeout=app.cfg.transfer_timeout + 5)
        except grpc.aio.AioRpcError as e:
            code = e.code() if e.code() != grpc.StatusCode.NOT_FOUND else grpc.StatusCode.ABORTED
            await context.abort(code, f"decode worker did not reserve KV for transfer {request.transfer_id}: "
                                      f"{e.details()}")
        held = decode_held(reserved, len(request.input_ids), app.cfg.page_size)
        if reserved.decode_computes:  # the decode worker holds all but a short suffix and computes it
            return worker_pb2.PrefillResult(cached_tokens=held)
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def on_done(job: PrefillJob, error: Exception | None) -> None:  # engine thread
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(error))

        job = PrefillJob(request_id=request.request_id, transfer_id=request.transfer_id,
                         prompt_ids=list(request.input_ids), params=params, sender=sender, on_done=on_done,
                         deadline=request.deadline_unix or None, grammar=grammar, decode_cached=held,
                         cache_salt=request.cache_salt)
        app.track(job)
        app.engine.submit(job)
        try:
            error = await done
        except asyncio.CancelledError:
            app.cancel(job, "prefill call cancelled")
            raise
        finally:
            app.untrack(job)
        if error is not None:
            # The engine already finished (or refused) this job; only its transfer may still be open.
            # An engine abort by request id would hit the job that holds the id, e.g. the original
            # of a refused duplicate.
            job.sender.abort(job.transfer_id, str(error))
            await context.abort(status_of(error), f"prefill of {request.request_id} failed: {error}")
        return worker_pb2.PrefillResult(first_token=job.first_token, first_logprob=job.first_logprob,
                                        kv_bytes=job.kv_bytes, transfer_seconds=job.transfer_seconds,
                                        compute_seconds=job.compute_seconds,
                                        cached_tokens=max(job.cached_len, job.decode_cached),
                                        grammar_applied=job.grammar_applied)

    def _validate(self, request: worker_pb2.PrefillRequest) -> str | None:
        if not request.request_id:
            return "request_id must be set"
        if not request.input_ids:
            return "input_ids must not be empty"
        if not request.decode_address:
            return "decode_address must be set"
        vocab = self.app.config.vocab_size
        bad = next((t for t in request.input_ids if t >= vocab), None)
        if bad is not None:
            return f"input_ids contains {bad}, outside the vocabulary [0, {vocab})"
        if len(request.input_ids) >= self.app.config.max_position_embeddings:
            return (f"prompt of {len(request.input_ids)} tokens does not fit the model context of "
                    f"{self.app.config.max_position_embeddings}")
        return None

    async def Abort(self, request: worker_pb2.AbortRequest, context) -> worker_pb2.AbortResponse:
        job = self.app.jobs.get(request.transfer_id)
        if job is not None:
            self.app.cancel(job, "aborted by the gateway")
        return worker_pb2.AbortResponse(found=job is not None)

    async def FlushCache(self, request: worker_pb2.FlushCacheRequest, context) -> worker_pb2.FlushCacheResponse:
        return await flush_cache(self.app.engine.flush_cache, self.app.cfg.transfer_timeout, context, "prefill")

    async def WatchCache(self, request: worker_pb2.WatchCacheRequest, context):
        async for event in watch_cache(self.app.cache_events, context):
            yield event

    async def GetInfo(self, request, context) -> worker_pb2.WorkerInfo:
        return self.app.info()

    async def GetLoad(self, request, context) -> worker_pb2.WorkerLoad:
        return self.app.load()
