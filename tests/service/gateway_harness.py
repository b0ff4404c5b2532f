"""Test harness: the real gateway (in-process grpc.aio) pointed at fake workers over loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import grpc

from gateway.config import GatewayConfig
from gateway.server import GatewayServer
from protos import gateway_pb2, gateway_pb2_grpc
from tests.service.fake_workers import FakeCluster, Script

T = TypeVar("T")
CONTEXT = 4096
GEN_TEMPERATURE = 0.6  # generation_config.json defaults written by conftest.model_dir
GEN_TOP_P = 0.95

WEATHER_TOOL = gateway_pb2.Tool(type="function", function=gateway_pb2.FunctionDefinition(
    name="get_weather", description="Get the weather"))
WEATHER_TOOL.function.parameters.update({
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"]})


def run(coro: Coroutine[object, object, T], timeout: float = 30.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


@dataclass
class Harness:
    cluster: FakeCluster
    gateway: GatewayServer
    channel: grpc.aio.Channel
    stub: gateway_pb2_grpc.GatewayStub

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"


def base_config(model_dir: Path, prefill: list[str], decode: list[str]) -> GatewayConfig:
    return GatewayConfig(model_path=str(model_dir), prefill=tuple(prefill), decode=tuple(decode),
                         host="127.0.0.1", port=0, http_port=0, served_model_name="glm-test", tool_call_parser="glm45",
                         reasoning_parser="glm45", context_length=CONTEXT, max_tokens_limit=1024,
                         health_check_interval=0.2, worker_rpc_timeout=1.0, shutdown_grace=0.5)


@asynccontextmanager
async def gateway_with_fakes(model_dir: Path, script_for: Callable[[object], Script], *, n_prefill: int = 1,
                             n_decode: int = 1, extra_decode: list[str] = (), **overrides) -> AsyncIterator[Harness]:
    cluster = await FakeCluster.start(script_for, n_prefill, n_decode)
    try:
        cfg = replace(base_config(model_dir, cluster.prefill_addrs, [*cluster.decode_addrs, *extra_decode]),
                      **overrides)
        gw = await GatewayServer.start(cfg)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}")
        try:
            yield Harness(cluster, gw, channel, gateway_pb2_grpc.GatewayStub(channel))
        finally:
            await channel.close()
            await gw.stop(0)
    finally:
        await cluster.stop()


def chat_request(text: str = "What is the weather in Paris?", **kw) -> gateway_pb2.ChatRequest:
    return gateway_pb2.ChatRequest(messages=[gateway_pb2.ChatMessage(role="user", content=text)], **kw)


def chunked(ids: list[int], sizes: list[int]) -> list[list[int]]:
    """Split ids into chunks of the given sizes, cycling through them."""
    out, i, k = [], 0, 0
    while i < len(ids):
        n = sizes[k % len(sizes)]
        out.append(ids[i:i + n])
        i, k = i + n, k + 1
    return out


async def collect(call) -> tuple[list[gateway_pb2.ChatResponse], dict]:
    """Read a Chat stream to the end; returns the messages and the assembled answer."""
    msgs = [m async for m in call]
    calls: dict[int, dict] = {}
    for m in msgs:
        for tc in m.delta.tool_calls:
            c = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            c["id"] += tc.id
            c["name"] += tc.name
            c["arguments"] += tc.arguments
    answer = {
        "reasoning": "".join(m.delta.reasoning_content for m in msgs),
        "content": "".join(m.delta.content for m in msgs),
        "calls": [calls[i] for i in sorted(calls)],
        "finish": msgs[-1].finish,
        "usage": msgs[-1].usage,
    }
    return msgs, answer
