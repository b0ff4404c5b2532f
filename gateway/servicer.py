"""GatewayServicer: one short method per RPC; proto in (convert.py -> the Pipeline's request
values), proto out; errors via context.abort.

The pipeline raises GatewayError (a status code and a message naming the field); anything else
is a bug: logged with its traceback and returned as INTERNAL, and the process keeps serving.
Cancellation (client gone, deadline) propagates as asyncio.CancelledError, never swallowed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TypeVar

import grpc

from common.serving import metrics
from gateway import convert
from gateway.errors import GatewayError
from gateway.pipeline import Pipeline
from protos import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline as a time.monotonic() instant (None: the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def Chat(self, request: gateway_pb2.ChatRequest,
                   context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.ChatResponse]:
        async for msg in self._stream(self._chat(request, deadline_of(context)), context):
            yield msg

    async def Generate(self, request: gateway_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        async for msg in self._stream(self._generate(request, deadline_of(context)), context):
            yield msg

    async def _chat(self, request: gateway_pb2.ChatRequest, deadline: float | None
                    ) -> AsyncIterator[gateway_pb2.ChatResponse]:
        async for msg in self.pipeline.chat(convert.chat_call(request, self.pipeline.limits), deadline):
            yield msg

    async def _generate(self, request: gateway_pb2.GenerateRequest, deadline: float | None
                        ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        async for msg in self.pipeline.generate(convert.generate_call(request, self.pipeline.limits), deadline):
            yield msg

    async def GetModelInfo(self, request: gateway_pb2.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> gateway_pb2.GetModelInfoResponse:
        return self.pipeline.model_info()

    async def ListModels(self, request: gateway_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> gateway_pb2.ListModelsResponse:
        return self.pipeline.list_models()

    async def _stream(self, messages: AsyncIterator[T], context: grpc.aio.ServicerContext) -> AsyncIterator[T]:
        status = grpc.StatusCode.OK
        inflight = metrics.queue_depth().labels(queue="gateway_inflight")
        inflight.inc()
        try:
            with self.pipeline.admission.slots():
                async for msg in messages:
                    yield msg
        except GatewayError as e:
            status = e.code
            await context.abort(e.code, e.message)
        except asyncio.CancelledError:
            status = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            status = grpc.StatusCode.INTERNAL
            log.exception("request failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in the gateway (logged)")
        finally:
            inflight.dec()
            metrics.requests_total().labels(status=status.name).inc()
            if status != grpc.StatusCode.OK:
                metrics.errors_total().labels(code=status.name).inc()
            await _aclose(messages)


async def _aclose(gen: AsyncIterator[object]) -> None:
    aclose = getattr(gen, "aclose", None)
    if aclose is not None:
        await aclose()
