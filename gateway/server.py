"""Gateway process assembly: gRPC servicer + health (aio) + reflection, the OpenAI HTTP server on the
same event loop, metrics, and ordered shutdown.

Readiness ("glmserve.v1.Gateway", and HTTP /health) is SERVING once the tokenizer and template are
loaded and at least one prefill and one decode worker answer; it follows the router's view
afterwards and turns NOT_SERVING first on SIGTERM, before in-flight requests of both surfaces get
`shutdown_grace` seconds to finish.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc

from common.serving import metrics
from common.serving.grpc_server import Health, add_health, add_reflection, make_server, serve_until_signal
from gateway import tls
from gateway.config import GatewayConfig
from gateway.http_server import HttpServer
from gateway.pipeline import Pipeline
from gateway.router import Router, RoutingConfig
from gateway.servicer import GatewayServicer
from protos import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name  # "glmserve.v1.Gateway"


@dataclass
class GatewayServer:
    config: GatewayConfig
    server: grpc.aio.Server
    health: Health
    router: Router
    pipeline: Pipeline
    port: int
    metrics_port: int | None
    http: HttpServer | None

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    @classmethod
    async def start(cls, config: GatewayConfig) -> GatewayServer:
        """Load the model files, bind, start serving, connect to the workers."""
        server = make_server(config.max_message_bytes)
        health = await add_health(server, [SERVICE_NAME])
        add_reflection(server, [SERVICE_NAME])

        async def on_readiness(ready: bool) -> None:
            await health.set_ready(ready)

        router = Router(config.prefill, config.decode, rpc_timeout=config.worker_rpc_timeout,
                        interval=config.health_check_interval, max_message_bytes=config.max_message_bytes,
                        on_readiness=on_readiness, routing=RoutingConfig(
                            cache_aware=not config.disable_radix_cache, approx_ttl=config.approx_cache_ttl,
                            load_threshold=config.routing_load_threshold,
                            local_prefill_max_tokens=config.local_prefill_max_tokens))
        pipeline = Pipeline.from_config(config, router)
        gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(pipeline), server)
        creds = tls.grpc_credentials(config)
        if creds is None:
            port = server.add_insecure_port(config.listen)
        else:
            port = server.add_secure_port(config.listen, creds)
        if port == 0:
            raise RuntimeError(f"could not bind {config.listen}")
        await server.start()
        http = None
        if config.http_port != -1:
            http = HttpServer(config, pipeline, router, health, port)
            await http.start()
        metrics_port = metrics.start_metrics_server(config.metrics_port, config.host)
        await router.start()  # first health round; readiness follows it
        host = config.http_host or config.host
        log.info("gateway serving %s on port %d (%s), metrics %s, prefill %s, decode %s",
                 config.model_name, port, "ready" if router.ready else "waiting for workers",
                 metrics_port, list(config.prefill), list(config.decode))
        scheme = "http" if creds is None else "https"
        log.info("OpenAI API: %s; gRPC API: %s:%d (glmserve.v1.Gateway%s)",
                 f"{scheme}://{host}:{http.port}/v1" if http is not None else "off", config.host, port,
                 "" if creds is None else ", TLS")
        return cls(config, server, health, router, pipeline, port, metrics_port, http)

    async def drain(self) -> None:
        await self.health.set_draining()

    async def stop(self, grace: float | None = None) -> None:
        await self.health.set_draining()
        await asyncio.gather(self.server.stop(self.config.shutdown_grace if grace is None else grace),
                             self.stop_http())
        await self.pipeline.close()
        await self.router.close()

    async def stop_http(self) -> None:
        """Stop accepting HTTP; in-flight HTTP requests get shutdown_grace, then are cancelled."""
        if self.http is not None:
            await self.http.stop()


async def serve(config: GatewayConfig) -> None:
    gw = await GatewayServer.start(config)
    http_stopped: list[asyncio.Task] = []

    async def drain() -> None:  # HTTP drains while gRPC does (serve_until_signal's stop(grace))
        http_stopped.append(asyncio.ensure_future(gw.stop_http()))

    try:
        await serve_until_signal(gw.server, gw.health, on_drain=drain, grace=config.shutdown_grace)
        await asyncio.gather(*http_stopped)
    finally:
        await gw.stop_http()
        await gw.pipeline.close()
        await gw.router.close()
