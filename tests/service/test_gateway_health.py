"""grpc.health.v1 on the gateway: liveness "", readiness "glmserve.v1.Gateway" follows the workers."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import worker_pb2_grpc
from tests.service.gateway_harness import Script, gateway_with_fakes, run

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _status(channel: grpc.aio.Channel, service: str) -> int:
    r = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    return r.status


async def _wait_for(channel: grpc.aio.Channel, service: str, status: int, timeout: float = 3.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await _status(channel, service) == status:
            return True
        await asyncio.sleep(0.05)
    return False


def test_readiness_follows_workers_and_drain(model_dir):
    async def scenario():
        seen = {}
        async with gateway_with_fakes(model_dir, lambda r: Script()) as h:
            ch = h.channel
            seen["live"] = await _status(ch, "")
            seen["ready"] = await _status(ch, "glmserve.v1.Gateway")
            # the only decode worker goes away: readiness drops, liveness stays
            decode_server = h.cluster.servers[-1]
            addr = h.cluster.decode_addrs[0]
            await decode_server.stop(None)
            seen["down"] = await _wait_for(ch, "glmserve.v1.Gateway", NOT_SERVING)
            seen["live_while_down"] = await _status(ch, "")
            # it comes back on the same address: readiness returns
            server = grpc.aio.server()
            worker_pb2_grpc.add_DecodeWorkerServicer_to_server(h.cluster.decodes[0], server)
            server.add_insecure_port(addr)
            await server.start()
            h.cluster.servers.append(server)
            seen["back"] = await _wait_for(ch, "glmserve.v1.Gateway", SERVING)
            # draining (SIGTERM's first step): NOT_SERVING for readiness, liveness still SERVING
            await h.gateway.drain()
            seen["drained"] = await _status(ch, "glmserve.v1.Gateway")
            seen["live_while_draining"] = await _status(ch, "")
            await asyncio.sleep(0.3)  # a health round must not flip a draining gateway back
            seen["still_drained"] = await _status(ch, "glmserve.v1.Gateway")
        return seen

    seen = run(scenario())
    assert seen == {"live": SERVING, "ready": SERVING, "down": True, "live_while_down": SERVING, "back": True,
                    "drained": NOT_SERVING, "live_while_draining": SERVING, "still_drained": NOT_SERVING}


def test_not_serving_until_a_worker_pair_answers(model_dir):
    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: Script(), n_decode=0, extra_decode=["127.0.0.1:1"]) as h:
            return await _status(h.channel, "glmserve.v1.Gateway"), await _status(h.channel, "")

    assert run(scenario()) == (NOT_SERVING, SERVING)
