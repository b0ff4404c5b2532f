"""common.serving.grpc_server / metrics / ids / log: the torch-free helpers every process uses."""

from __future__ import annotations

import asyncio
import logging
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.serving import ids, metrics
from common.serving.grpc_server import (
    add_health,
    add_reflection,
    client_channel_options,
    make_server,
    serve_until_signal,
    server_options,
)
from common.serving.log import setup_logging

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_ordered_shutdown_not_serving_then_drain_then_stop() -> None:
    async def scenario():
        server = make_server(1024 * 1024)
        health = await add_health(server, ["test.v1.Svc"])
        add_reflection(server, ["test.v1.Svc"])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = health_pb2_grpc.HealthStub(channel)

        async def check(service: str) -> int:
            return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)).status

        seen = {"loading": await check("test.v1.Svc")}
        await health.set_ready()
        seen["ready"] = await check("test.v1.Svc")

        async def on_drain() -> None:  # runs after readiness went NOT_SERVING, before stop
            seen["drain_ready"] = await check("test.v1.Svc")
            seen["drain_live"] = await check("")

        stop = asyncio.Event()
        task = asyncio.ensure_future(serve_until_signal(server, health, on_drain, grace=0.2, stop_event=stop))
        await asyncio.sleep(0.05)
        assert not task.done()
        stop.set()
        await asyncio.wait_for(task, 5)
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await check("")
        seen["after_stop"] = ei.value.code()
        await channel.close()
        return seen

    seen = asyncio.run(scenario())
    assert seen == {"loading": NOT_SERVING, "ready": SERVING, "drain_ready": NOT_SERVING, "drain_live": SERVING,
                    "after_stop": grpc.StatusCode.UNAVAILABLE}


def test_metrics_are_get_or_create_and_served_over_http() -> None:
    assert metrics.requests_total() is metrics.requests_total()
    assert metrics.kv_pages() is metrics.kv_pages()
    metrics.kv_pages().labels(state="free").set(7)
    metrics.requests_total().labels(status="OK").inc()
    port = metrics.start_metrics_server(0, addr="127.0.0.1")
    assert port
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'glmserve_kv_pages{state="free"} 7.0' in body
    assert 'glmserve_requests_total{status="OK"}' in body
    for create in (metrics.ttft_seconds, metrics.inter_token_latency_seconds, metrics.queue_depth,
                   metrics.kv_transfer_bytes_total, metrics.kv_transfer_seconds, metrics.errors_total,
                   metrics.spec_accept_length):
        assert create() is create()
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for name in ("glmserve_ttft_seconds_bucket", "glmserve_inter_token_latency_seconds_count",
                 "glmserve_kv_transfer_bytes_total", "glmserve_kv_transfer_seconds_sum",
                 "glmserve_spec_accept_length_bucket"):
        assert name in body, name
    assert metrics.start_metrics_server(None, "127.0.0.1") is None


def test_transfer_ids_are_nonzero_uint64_and_request_ids_unique() -> None:
    drawn = {ids.new_transfer_id() for _ in range(1000)}
    assert len(drawn) == 1000 and all(ids.is_valid_transfer_id(t) for t in drawn)
    assert max(drawn) > 2**63  # the full 64-bit range is used
    a, b = ids.new_request_id(), ids.new_request_id("cmpl-")
    assert a.startswith("chatcmpl-") and b.startswith("cmpl-") and a[9:] != b[5:]


def test_log_prefix_names_role_and_rank(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("decode", rank=1, level="DEBUG")
    logging.getLogger("decode_worker.worker").info("hello")
    err = capsys.readouterr().err
    assert "INFO  decode[1] decode_worker.worker: hello" in err
    with pytest.raises(ValueError):
        setup_logging("x", level="LOUD")
    setup_logging("test", level="WARNING")



def test_servers_accept_the_keepalive_pings_of_our_clients() -> None:
    """A default gRPC server GOAWAYs ("too_many_pings") clients that ping more often than every
    5 minutes, which kills long silent calls; our servers must accept our clients' pings."""
    client, server = dict(client_channel_options()), dict(server_options())
    assert server["grpc.http2.max_ping_strikes"] == 0
    assert server["grpc.http2.min_recv_ping_interval_without_data_ms"] <= client["grpc.keepalive_time_ms"]
    assert client["grpc.keepalive_timeout_ms"] < client["grpc.keepalive_time_ms"]
    assert server["grpc.max_receive_message_length"] == client["grpc.max_receive_message_length"]
