"""Torch-free grpc.aio helpers shared by the gateway and the workers.

make_server   grpc.aio server with message-size limits, keepalive pings accepted, and malformed
              requests answered INVALID_ARGUMENT (MalformedRequests)
add_health    grpc.health.v1 (aio): "" = liveness, each full service name = readiness
add_reflection
serve_until_signal   SIGTERM/SIGINT -> readiness NOT_SERVING -> drain callback -> stop(grace)
install_uvloop / run
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def message_size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def client_channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel options for calls between our processes: a dead peer is noticed within seconds, and a
    peer that comes (back) up within about a second: gRPC's default reconnect backoff grows to two
    minutes, so a worker that took a while to start or restart would sit unseen long after it serves."""
    return message_size_options(max_message_bytes) + [
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 1_000),
        ("grpc.keepalive_time_ms", 5_000),
        ("grpc.keepalive_timeout_ms", 3_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 0),  # the gateway retries itself, on another worker pair
    ]


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Server options of every glmserve process. A default gRPC server answers pings more frequent
    than every 5 minutes with GOAWAY "too_many_pings", which kills long silent calls (a queued
    prefill); these accept the keepalive pings of client_channel_options."""
    return message_size_options(max_message_bytes) + [
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 4_000),
        ("grpc.http2.max_ping_strikes", 0),  # 0 = never GOAWAY for pings
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
    ]


class _Malformed:
    """What a request that does not parse deserializes to; the handler answers INVALID_ARGUMENT."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _safe_deserializer(deserialize: Callable[[bytes], object] | None) -> Callable[[bytes], object]:
    def run(data: bytes) -> object:
        try:
            return deserialize(data) if deserialize is not None else data
        except Exception as e:  # noqa: BLE001 - DecodeError (bad wire data, bad UTF-8) and its kin
            return _Malformed(f"{type(e).__name__}: {str(e)[:200]}")
    return run


async def _refuse(method: str, context: grpc.aio.ServicerContext, bad: _Malformed) -> None:
    log.warning("%s from %s: malformed request refused (%s)", method, context.peer(), bad.reason)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: cannot parse {method}'s "
                        f"request message ({bad.reason})")


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Every method's request is parsed by a wrapper that never raises: gRPC parses requests before
    any servicer code runs, and a parse error there reaches the client as UNKNOWN with a traceback
    in the log. A request that does not parse (corrupt or truncated wire data, invalid UTF-8 in a
    string field) is answered INVALID_ARGUMENT with one log line instead, for every service of the
    process (health and reflection included), without touching the generated servicers."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        fields = {"request_deserializer": _safe_deserializer(handler.request_deserializer)}
        if handler.unary_unary is not None:
            fields["unary_unary"] = _unary(method, handler.unary_unary)
        elif handler.unary_stream is not None:
            fields["unary_stream"] = _unary_stream(method, handler.unary_stream)
        elif handler.stream_unary is not None:
            fields["stream_unary"] = _unary(method, handler.stream_unary, streamed=True)
        else:
            fields["stream_stream"] = _unary_stream(method, handler.stream_stream, streamed=True)
        return handler._replace(**fields)


async def _checked(method: str, requests: AsyncIterator[object], context: grpc.aio.ServicerContext):
    async for r in requests:
        if isinstance(r, _Malformed):
            await _refuse(method, context, r)
        yield r


def _unary(method: str, behaviour: Callable, streamed: bool = False) -> Callable:
    async def run(request: object, context: grpc.aio.ServicerContext) -> object:
        if streamed:
            return await behaviour(_checked(method, request, context), context)
        if isinstance(request, _Malformed):
            await _refuse(method, context, request)
        return await behaviour(request, context)
    return run


def _unary_stream(method: str, behaviour: Callable, streamed: bool = False) -> Callable:
    async def run(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
        if streamed:
            request = _checked(method, request, context)
        elif isinstance(request, _Malformed):
            await _refuse(method, context, request)
        result = behaviour(request, context)
        if hasattr(result, "__aiter__"):
            async with contextlib.aclosing(result):
                async for item in result:
                    yield item
        else:  # a handler that writes with context.write() and returns a coroutine
            await result
    return run


def make_server(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> grpc.aio.Server:
    """A grpc.aio server. Requests above `max_message_bytes` are refused with RESOURCE_EXHAUSTED
    by gRPC itself (before any parsing); requests that do not parse get INVALID_ARGUMENT
    (MalformedRequests); client keepalive pings (client_channel_options) are accepted. Workers
    must build their servers with this too."""
    return grpc.aio.server(options=server_options(max_message_bytes), interceptors=[MalformedRequests()])


class Health:
    """grpc.health.v1 state of one process.

    Liveness (service "") is SERVING from the start until the server stops. Readiness (each full
    service name) is NOT_SERVING until `set_ready()` (loading) and again after `set_draining()`.
    """

    def __init__(self, servicer: health.aio.HealthServicer, services: Iterable[str]) -> None:
        self.servicer = servicer
        self.services = tuple(services)
        self.draining = False

    async def set_ready(self, ready: bool = True) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready and not self.draining \
            else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.services:
            await self.servicer.set(name, status)

    async def set_draining(self) -> None:
        self.draining = True
        await self.set_ready(False)

    async def set_stopped(self) -> None:
        await self.servicer.enter_graceful_shutdown()


async def add_health(server: grpc.aio.Server, services: Iterable[str]) -> Health:
    """Register grpc.health.v1 on `server`; readiness starts NOT_SERVING (call set_ready)."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    h = Health(servicer, services)
    await h.set_ready(False)
    return h


def add_reflection(server: grpc.aio.Server, services: Iterable[str]) -> None:
    """Server reflection for `services` plus health and reflection themselves (grpcurl list)."""
    names = (*services, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)


async def serve_until_signal(
    server: grpc.aio.Server,
    health_state: Health,
    on_drain: Callable[[], Awaitable[None]] | None = None,
    grace: float = 10.0,
    stop_event: asyncio.Event | None = None,
) -> None:
    """Wait for SIGTERM/SIGINT (or `stop_event`), then shut down in order: readiness NOT_SERVING,
    `on_drain()` (e.g. finish or fail in-flight work), `server.stop(grace)`."""
    loop = asyncio.get_running_loop()
    stop = stop_event or asyncio.Event()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread / platform
            pass
    try:
        await stop.wait()
        log.info("shutting down: readiness NOT_SERVING, draining, then stop(grace=%.1fs)", grace)
        await health_state.set_draining()
        if on_drain is not None:
            await on_drain()
        await health_state.set_stopped()
        await server.stop(grace)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def install_uvloop() -> bool:
    """Make uvloop the event loop policy when it is installed; returns whether it is."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def run(main: Coroutine[object, object, T]) -> T:
    """asyncio.run on uvloop when available."""
    install_uvloop()
    return asyncio.run(main)
