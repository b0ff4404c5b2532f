"""DecodeWorker gRPC servicer: thin translation between worker.proto and the engine."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING

import grpc

from common.grammar.state import grammar_state_for
from common.serving import metrics
from common.serving.cache_events import flush_cache, watch_cache
from common.serving.sampling_params import SamplingParams
from common.transport.auth import PAIR_AUTH_KEY, PAIR_PROOF_KEY, AuthError
from decode_worker.output import ErrorEvent, FinishEvent, OutputChannel, TokenEvent
from decode_worker.scheduler import DecodeReq, QueueFullError
from protos import worker_pb2, worker_pb2_grpc

if TYPE_CHECKING:
    from decode_worker.server import DecodeWorkerApp

log = logging.getLogger(__name__)


class DecodeServicer(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, worker: DecodeWorkerApp) -> None:
        self.w = worker

    async def Generate(self, request: worker_pb2.DecodeRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.DecodeChunk]:
        w = self.w
        if w.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "decode worker is draining; retry on another")
        req = self._to_req(request)
        if isinstance(req, str):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, req)
        w.streams.add(req)
        try:
            try:  # compiled on the grammar pool: neither the event loop nor the engine waits for it
                req.grammar = await grammar_state_for(w.grammar, req.params, w.think_end_id)
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            await self._admit(req, context)
            async with aclosing(self._stream(req, context)) as chunks:  # its finally runs before ours
                async for chunk in chunks:
                    yield chunk
        finally:
            w.streams.discard(req)

    async def _admit(self, req: DecodeReq, context: grpc.aio.ServicerContext) -> None:
        admitted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.w.engine.submit(req, admitted)
        try:
            await admitted
        except asyncio.CancelledError:  # client gone before admission: the engine may still admit it
            self.w.engine.abort(req.request_id, "CANCELLED", "client cancelled", only=req)
            raise
        except QueueFullError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def _stream(self, req: DecodeReq,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.DecodeChunk]:
        """The admitted request's events as chunks, until its finish or error (only what the engine sent)."""
        finished = False
        last_at = time.monotonic()  # admission, then the last token event
        last: TokenEvent | None = None
        try:
            while True:
                ev = await req.channel.get()
                if isinstance(ev, TokenEvent):
                    now = time.monotonic()
                    if last is None:
                        metrics.ttft_seconds().observe(now - last_at)
                    else:
                        metrics.inter_token_latency_seconds().observe((now - last_at) / max(1, len(ev.token_ids)))
                    last, last_at = ev, now
                    yield _chunk(ev)
                elif isinstance(ev, FinishEvent):
                    finished = True
                    metrics.requests_total().labels(status="OK").inc()
                    yield _finish_chunk(ev, last)
                    return
                else:
                    assert isinstance(ev, ErrorEvent)
                    finished = True
                    await context.abort(getattr(grpc.StatusCode, ev.code), ev.message)
        finally:
            if not finished:  # client gone or deadline: free everything on this worker
                self.w.engine.abort(req.request_id, "CANCELLED", "client cancelled", only=req)

    def _to_req(self, request: worker_pb2.DecodeRequest) -> DecodeReq | str:
        w = self.w
        if not request.request_id:
            return "request_id must be set"
        if not request.input_ids:
            return "input_ids must not be empty"
        vocab = w.config.vocab_size
        bad = next((t for t in request.input_ids if t >= vocab), None)
        if bad is not None:
            return f"input_ids contains {bad}, outside the vocabulary [0, {vocab})"
        try:
            params = SamplingParams.from_wire(request.sampling, vocab_size=vocab)
        except ValueError as e:
            return str(e)
        limit = w.config.max_position_embeddings
        if len(request.input_ids) + params.max_tokens > limit:
            return (f"prompt ({len(request.input_ids)} tokens) + sampling.max_tokens ({params.max_tokens}) "
                    f"exceeds the model context of {limit} tokens")
        return DecodeReq(
            request_id=request.request_id, transfer_id=request.transfer_id, prompt_ids=list(request.input_ids),
            params=params, channel=OutputChannel(asyncio.get_running_loop()),
            deadline=request.deadline_unix or None, local_prefill=request.local_prefill,
            cache_salt=request.cache_salt,
        )

    async def AwaitReserved(self, request: worker_pb2.ReserveQuery,
                            context: grpc.aio.ServicerContext) -> worker_pb2.ReserveReply:
        timeout = min(max(request.timeout_seconds, 0.0), 600.0) or self.w.cfg.transfer_timeout
        answer = await self.w.engine.wait_reserved(request.transfer_id, timeout)
        if answer is not None:
            return worker_pb2.ReserveReply(reserved=True, cached_tokens=answer.cached_tokens,
                                           decode_computes=answer.decode_computes)
        await context.abort(grpc.StatusCode.NOT_FOUND,
                            f"transfer {request.transfer_id} has no KV reservation on this decode worker "
                            f"after {timeout:.1f}s (request unknown, queued for memory, or aborted)")

    async def Abort(self, request: worker_pb2.AbortRequest, context) -> worker_pb2.AbortResponse:
        found = self.w.streaming(request.request_id)
        self.w.engine.abort(request.request_id, "CANCELLED", "aborted by the gateway")
        return worker_pb2.AbortResponse(found=found)

    async def FlushCache(self, request: worker_pb2.FlushCacheRequest, context) -> worker_pb2.FlushCacheResponse:
        return await flush_cache(self.w.engine.flush_cache, self.w.cfg.transfer_timeout, context, "decode")

    async def WatchCache(self, request: worker_pb2.WatchCacheRequest, context):
        async for event in watch_cache(self.w.cache_events, context):
            yield event

    async def GetInfo(self, request, context) -> worker_pb2.WorkerInfo:
        return self.w.info()

    async def GetLoad(self, request, context) -> worker_pb2.WorkerLoad:
        return self.w.load()

    async def Pair(self, request: worker_pb2.PairRequest, context) -> worker_pb2.PairResponse:
        auth = self.w.acceptor.config.auth
        nonce = ""
        if auth is not None and auth.enabled:
            token = dict(context.invocation_metadata() or ()).get(PAIR_AUTH_KEY)
            try:
                nonce = auth.check_request(token, request.prefill.worker_id)
            except AuthError as e:
                log.warning("Pair from %s (%s): %s", context.peer(), request.prefill.worker_id[:64], e)
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        try:
            resp = await self.w.pair(request.prefill, request.src_rank, request.dst_rank)
        except ValueError as e:  # PairingError included
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        if nonce:
            context.set_trailing_metadata(((PAIR_PROOF_KEY, auth.response_proof(nonce, resp.group_name)),))
        return resp


def _chunk(ev: TokenEvent) -> worker_pb2.DecodeChunk:
    chunk = worker_pb2.DecodeChunk(token_ids=ev.token_ids, completion_tokens=ev.completion_tokens,
                                   spec_verify_steps=ev.spec_verify_steps,
                                   spec_accepted_drafts=ev.spec_accepted_drafts, grammar_tokens=ev.grammar_tokens)
    for tok, lp, top in ev.logprobs:
        chunk.logprobs.add(token_id=tok, logprob=lp if lp is not None else 0.0,
                           top_ids=[t for t, _ in top], top_logprobs=[v for _, v in top])
    return chunk


def _finish_chunk(ev: FinishEvent, last: TokenEvent | None) -> worker_pb2.DecodeChunk:
    """The closing chunk. Counters are cumulative, so it repeats the last token event's (a request
    finishes in the same emission as the token that finished it: those are the final values)."""
    fin = worker_pb2.Finish(reason=ev.reason)
    if ev.matched_token_id is not None:
        fin.token_id = ev.matched_token_id
    if last is None:
        return worker_pb2.DecodeChunk(finish=fin)
    return worker_pb2.DecodeChunk(finish=fin, completion_tokens=last.completion_tokens,
                                  spec_verify_steps=last.spec_verify_steps,
                                  spec_accepted_drafts=last.spec_accepted_drafts,
                                  grammar_tokens=last.grammar_tokens)
