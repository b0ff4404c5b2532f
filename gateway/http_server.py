"""OpenAI-compatible HTTP of the gateway: aiohttp on the gRPC server's event loop, one thin adapter
over the same Pipeline (docs/openai_http.md).

Routes: POST /v1/chat/completions and /v1/completions (stream and not), GET /v1/models[/{id}],
/health, /health_generate, /liveness, /readiness, /metrics, /get_model_info, /get_server_info,
/version, POST /abort_request. A request is converted (openai_request.py), validated and dispatched
before anything is sent, so its errors are real HTTP statuses; a stream is committed (200 and the
role chunks) when the first answer arrives, or after --stream-commit-timeout, and then carries
keep-alive comments every --sse-keepalive seconds of silence. An error after the commit is an SSE
`data: {"error": ...}` event followed by `data: [DONE]`. A client that disconnects cancels its
handler (handler_cancellation), which closes the Pipeline's iterators and so aborts both worker
legs; a client that stops reading is cut off once --max-pending-stream-bytes are unsent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from common.serving import metrics
from common.serving.grpc_server import Health
from gateway import openai_request, tls
from gateway.calls import GenerateCall, Sampling
from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from gateway.openai_errors import error_body, from_gateway_error
from gateway.openai_request import HttpRequest, Limits
from gateway.openai_response import ChatFormatter, CompletionFormatter
from gateway.pipeline import Pipeline
from gateway.router import Router

log = logging.getLogger(__name__)
T = TypeVar("T")
Code = grpc.StatusCode

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
IGNORED_HEADER = "X-Glmserve-Ignored-Fields"
DONE = b"data: [DONE]\n\n"
HEALTH_GENERATE_TTL = 5.0  # seconds a /health_generate answer is reused, so probes cannot load the workers
_OPEN_PATHS = ("/health", "/health_generate", "/liveness", "/readiness", "/metrics", "/version")


class SlowClient(Exception):
    """The client stopped reading: too many bytes of its stream are unsent."""


def _event(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _json(status: int, obj: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj), content_type="application/json", headers=headers)


def _error(status_code: grpc.StatusCode, message: str, field: str | None = None,
           code: str | None = None) -> web.Response:
    status, body, headers = error_body(status_code, message, field, code)
    return _json(status, body, headers)


async def merged(gens: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """(index, item) from several async iterators as the items come; closing this closes them all."""
    if len(gens) == 1:
        try:
            async for item in gens[0]:
                yield 0, item
        finally:
            await gens[0].aclose()
        return
    pending = {asyncio.ensure_future(anext(g)): i for i, g in enumerate(gens)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(gens[i]))] = i
                yield i, item
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for g in gens:
            await g.aclose()


class SseStream:
    """One committed-on-demand SSE response; every write goes through one lock, so the keep-alive
    watchdog and the answer never interleave."""

    def __init__(self, request: web.Request, preamble: Callable[[], list[dict]], headers: dict[str, str],
                 max_pending: int) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None
        self.last_write = time.monotonic()
        self._preamble = preamble
        self._headers = headers
        self._max_pending = max_pending
        self._lock = asyncio.Lock()

    @property
    def committed(self) -> bool:
        return self.response is not None

    async def commit(self) -> None:
        async with self._lock:
            await self._commit()

    async def send(self, data: bytes) -> None:
        async with self._lock:
            await self._commit()
            await self._write(data)

    async def keepalive(self) -> None:
        async with self._lock:
            if self.response is not None:
                await self._write(b": keep-alive\n\n")

    async def _commit(self) -> None:
        if self.response is not None:
            return
        resp = web.StreamResponse(status=200, headers={**SSE_HEADERS, **self._headers})
        await resp.prepare(self.request)
        transport = self.request.transport
        if transport is not None:  # let writes buffer up to the limit instead of blocking, then cut off
            transport.set_write_buffer_limits(high=self._max_pending)
        self.response = resp
        for chunk in self._preamble():
            await self._write(_event(chunk))

    async def _write(self, data: bytes) -> None:
        transport = self.request.transport
        if transport is not None and transport.get_write_buffer_size() > self._max_pending:
            raise SlowClient(f"{transport.get_write_buffer_size()} bytes unsent")
        await self.response.write(data)
        self.last_write = time.monotonic()

    async def watchdog(self, commit_after: float, keepalive: float) -> None:
        """Commit after `commit_after` seconds without an answer; once committed, a comment after every
        `keepalive` seconds without a write keeps proxies from closing the connection."""
        start = time.monotonic()
        while True:
            now = time.monotonic()
            if not self.committed:
                wait = commit_after - (now - start)
                if wait <= 0:
                    await self.commit()
                else:
                    await asyncio.sleep(min(wait, keepalive))
                continue
            idle = now - self.last_write
            if idle >= keepalive:
                await self.keepalive()
            else:
                await asyncio.sleep(keepalive - idle)


class HttpServer:
    def __init__(self, config: GatewayConfig, pipeline: Pipeline, router: Router, health: Health,
                 grpc_port: int) -> None:
        self.config = config
        self.grpc_port = grpc_port
        self.pipeline = pipeline
        self.router = router
        self.health = health
        self.limits = Limits(max_n=config.max_n, strict_fields=config.strict_request_fields,
                             strict_model=config.strict_model_name, served_name=config.model_name,
                             max_concurrent=config.max_concurrent_requests, request=pipeline.limits)
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: dict[str, asyncio.Task] = {}  # request id -> handler task (/abort_request)
        self._health_generate: tuple[float, bool] | None = None
        app = web.Application(client_max_size=config.max_message_bytes, middlewares=[self._middleware])
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_get("/health", self.health_check)
        app.router.add_get("/readiness", self.health_check)
        app.router.add_get("/liveness", self.liveness)
        app.router.add_get("/health_generate", self.health_generate)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/get_model_info", self.model_info)
        app.router.add_get("/get_server_info", self.server_info)
        app.router.add_get("/version", self.version)
        app.router.add_post("/abort_request", self.abort_request)
        app.router.add_post("/flush_cache", self.flush_cache)
        self.app = app

    async def start(self) -> int:
        runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                               shutdown_timeout=self.config.shutdown_grace)
        await runner.setup()
        site = web.TCPSite(runner, self.config.http_host or self.config.host, self.config.http_port,
                           ssl_context=tls.http_context(self.config))
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish for --shutdown-grace, cancel the rest."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- middleware --------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        key = self.config.api_key
        if key and request.path not in _OPEN_PATHS and not (request.method == "GET" and request.path == "/v1/models") \
                and request.headers.get("Authorization") != f"Bearer {key}":
            return _error(Code.UNAUTHENTICATED, "missing or wrong API key (Authorization: Bearer ...)")
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return _json(413, {"error": {"message": f"request body above --max-message-bytes "
                                                    f"({self.config.max_message_bytes})",
                                         "type": "invalid_request_error", "param": None,
                                         "code": "request_too_large"}})
        except web.HTTPNotFound:
            return _error(Code.NOT_FOUND, f"no route {request.path}; the OpenAI API is served at /v1/chat/completions,"
                                          " /v1/completions and /v1/models")
        except web.HTTPMethodNotAllowed as e:
            return _json(405, {"error": {"message": f"{request.method} {request.path} is not allowed ({e.allowed_methods})",
                                         "type": "invalid_request_error", "param": None, "code": "method_not_allowed"}})

    # -- OpenAI ------------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> Any:
        try:
            return orjson.loads(await request.read())
        except orjson.JSONDecodeError as e:
            raise GatewayError(Code.INVALID_ARGUMENT, f"the request body is not valid JSON: {e}", None,
                               "invalid_json") from None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        async def convert() -> HttpRequest:
            return openai_request.chat_request(await self._body(request), self.limits)

        def answer(req: HttpRequest) -> tuple[Any, list[AsyncIterator]]:
            fmt = ChatFormatter(req, int(time.time()), self.config.reasoning_field)
            return fmt, [self.pipeline.chat(call, None) for call in req.calls]
        return await self._serve(request, convert, answer)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        async def convert() -> HttpRequest:
            return openai_request.completion_request(await self._body(request), self.limits)

        def answer(req: HttpRequest) -> tuple[Any, list[AsyncIterator]]:
            echo = [c.text if c.text is not None else self.pipeline.tokenizer.decode(c.token_ids)
                    for c in req.calls] if req.echo else ["" for _ in req.calls]
            fmt = CompletionFormatter(req, int(time.time()), echo, req.per_prompt)
            return fmt, [self.pipeline.generate(call, None) for call in req.calls]
        return await self._serve(request, convert, answer)

    async def _serve(self, request: web.Request, convert: Callable[[], Awaitable[HttpRequest]],
                     answer: Callable[[HttpRequest], tuple[Any, list[AsyncIterator]]]
                     ) -> web.StreamResponse:
        status = Code.OK
        inflight = metrics.queue_depth().labels(queue="gateway_inflight")
        inflight.inc()
        req: HttpRequest | None = None
        try:
            req = await convert()
            if req.request_id in self._tasks:
                raise GatewayError(Code.ALREADY_EXISTS, f"rid {req.request_id!r} is already in flight", "rid")
            self._tasks[req.request_id] = asyncio.current_task()
            headers = {IGNORED_HEADER: ", ".join(req.ignored)} if req.ignored else {}
            if req.ignored:
                log.debug("request %s: ignored fields %s", req.request_id, ", ".join(req.ignored))
            with self.pipeline.admission.slots(len(req.calls)):
                fmt, gens = answer(req)  # HTTP clients send no deadline: the Pipeline's --request-timeout
                events = merged(gens)
                try:
                    if req.stream:
                        return await self._stream(request, req, fmt, events, headers)
                    finals: list = [None] * len(req.calls)
                    async for i, msg in events:
                        finals[i] = msg
                    return _json(200, fmt.body(finals), headers)
                finally:
                    await events.aclose()
        except GatewayError as e:
            status = e.code
            s, body, headers = from_gateway_error(e)
            return _json(s, body, headers)
        except asyncio.CancelledError:
            status = Code.CANCELLED
            raise
        except web.HTTPException:  # aiohttp's own (413 body too large): the middleware answers
            status = Code.INVALID_ARGUMENT
            raise
        except Exception:
            status = Code.INTERNAL
            log.exception("HTTP request failed")
            return _error(Code.INTERNAL, "internal error in the gateway (logged)")
        finally:
            inflight.dec()
            if req is not None and self._tasks.get(req.request_id) is asyncio.current_task():
                del self._tasks[req.request_id]
            metrics.requests_total().labels(status=status.name).inc()
            if status != Code.OK:
                metrics.errors_total().labels(code=status.name).inc()

    async def _stream(self, request: web.Request, req: HttpRequest, fmt: Any, events: AsyncIterator,
                      headers: dict[str, str]) -> web.StreamResponse:
        preamble = fmt.role_chunks if isinstance(fmt, ChatFormatter) else fmt.echo_chunks
        sse = SseStream(request, preamble, headers, self.config.max_pending_stream_bytes)
        watchdog = asyncio.ensure_future(sse.watchdog(self.config.stream_commit_timeout, self.config.sse_keepalive))
        try:
            async for i, msg in events:
                for chunk in fmt.chunks(i, msg):
                    await sse.send(_event(chunk))
            if req.include_usage:
                await sse.send(_event(fmt.usage_chunk()))
            await sse.send(DONE)
        except GatewayError as e:
            if not sse.committed:
                raise
            log.warning("request %s failed after its stream started: %s", req.request_id, e.message)
            _, body, _ = from_gateway_error(e)
            await sse.send(_event(body) + DONE)
        except SlowClient as e:
            metrics.http_slow_client_aborts_total().inc()
            log.warning("request %s: the client stopped reading (%s); aborting it", req.request_id, e)
            if request.transport is not None:
                request.transport.abort()
        finally:
            watchdog.cancel()
        return sse.response

    # -- models, health, info -----------------------------------------------------------------

    def _model_card(self) -> dict:
        return {"id": self.config.model_name, "object": "model", "created": self.pipeline.created,
                "owned_by": "glmserve", "root": self.config.model_path,
                "max_model_len": self.pipeline.model.context_length}

    async def models(self, request: web.Request) -> web.Response:
        return _json(200, {"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name != self.config.model_name:
            return _error(Code.NOT_FOUND, f"The model '{name}' does not exist", "model", "model_not_found")
        return _json(200, self._model_card())

    @property
    def ready(self) -> bool:
        return self.router.ready and not self.health.draining

    async def health_check(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.ready else 503)

    async def liveness(self, request: web.Request) -> web.Response:
        return _json(200, {"status": "alive"})

    async def health_generate(self, request: web.Request) -> web.Response:
        """One greedy 1-token generation through both worker legs (reused for a few seconds)."""
        now = time.monotonic()
        if self._health_generate is None or now - self._health_generate[0] > HEALTH_GENERATE_TTL:
            ok = self.ready
            if ok:
                call = GenerateCall(sampling=Sampling(given={"max_tokens": 1, "temperature": 0}), text="Hi",
                                    stream=False, request_id=f"health-generate-{int(now * 1000)}")
                try:
                    async for _ in self.pipeline.generate(call, time.monotonic() + 20):
                        pass
                except GatewayError as e:
                    log.warning("/health_generate failed: %s", e.message)
                    ok = False
            self._health_generate = (time.monotonic(), ok)
        return web.Response(status=200 if self._health_generate[1] else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def model_info(self, request: web.Request) -> web.Response:
        info = self.pipeline.model_info()
        spec = info.speculative
        return _json(200, {
            "model_path": info.model_path, "tokenizer_path": info.model_path, "served_model_name": info.served_model_name,
            "is_generation": True, "max_context_length": info.max_context_length, "vocab_size": info.vocab_size,
            "eos_token_ids": list(info.eos_token_ids), "tool_call_parser": info.tool_call_parser or None,
            "reasoning_parser": info.reasoning_parser or None,
            "speculative": {"algorithm": spec.algorithm or None, "num_steps": spec.num_steps,
                            "eagle_topk": spec.eagle_topk, "num_draft_tokens": spec.num_draft_tokens}})

    async def server_info(self, request: web.Request) -> web.Response:
        c = self.config
        return _json(200, {
            "version": _version(), "served_model_name": c.model_name, "model_path": c.model_path,
            "tool_call_parser": c.tool_call_parser, "reasoning_parser": c.reasoning_parser,
            "enable_custom_logit_processor": c.enable_custom_logit_processor,
            "default_thinking_budget": c.default_thinking_budget, "max_n": c.max_n,
            "grpc_port": self.grpc_port, "http_port": self.port,
            "prefill": list(c.prefill), "decode": list(c.decode),
            "workers": [{"role": w.role, "address": w.address, "healthy": w.healthy} for w in self.router.workers]})

    async def version(self, request: web.Request) -> web.Response:
        return _json(200, {"version": _version()})

    async def abort_request(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        rid = body.get("rid") if isinstance(body, dict) else None
        if not isinstance(rid, str):
            return _error(Code.INVALID_ARGUMENT, "rid must be a string", "rid")
        task = self._tasks.get(rid)
        if task is not None:
            task.cancel()
        return _json(200, {"found": task is not None})


    async def flush_cache(self, request: web.Request) -> web.Response:
        """SGLang's endpoint: forget every worker's prefix cache and the gateway's routing index.
        200 with each worker's pages freed (or "unsupported"); 503 when a worker could not flush."""
        results = await self.router.flush_caches()
        failed = sorted(a for a, r in results.items() if isinstance(r, str) and r.startswith("failed"))
        if failed:
            return _error(Code.UNAVAILABLE, "cache not flushed on " + ", ".join(f"{a} ({results[a]})" for a in failed),
                          code="cache_not_flushed")
        return _json(200, {"flushed": True, "workers": results})


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    with contextlib.suppress(PackageNotFoundError):
        return version("glmserve")
    return "unknown"
