"""The one place that orders a request:
render -> tokenize -> resolve sampling -> route -> dispatch (retry) -> detokenize -> stop strings
-> reasoning / tool parsers -> typed deltas -> finish + usage.

A dispatch attempt that fails with a retryable status before the first token moves to another
(prefill, decode) pair with a fresh transfer id; after the first token a failure ends the request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

from common.serving import metrics
from common.serving.ids import new_request_id, new_transfer_id
from common.serving.sampling_params import ServerSampling
from gateway import convert
from gateway.chat_output import ChatOutput, TextOutput, apply_finish
from gateway.chat_template import ChatTemplate, ChatTemplateError
from gateway.config import GatewayConfig
from gateway.errors import GatewayError, invalid
from gateway.model_info import ModelInfo
from gateway.router import Router
from gateway.tokenizer import Tokenizer
from gateway.worker_client import Dispatch, LegError, LegRequest
from protos import gateway_pb2, worker_pb2

log = logging.getLogger(__name__)


@dataclass
class _Progress:
    """What the dispatch loop learned, for usage and metrics."""
    start: float = field(default_factory=time.monotonic)
    last_chunk: float | None = None
    prefill: worker_pb2.PrefillResult | None = None
    last: worker_pb2.DecodeChunk | None = None


class Pipeline:
    def __init__(self, config: GatewayConfig, router: Router, tokenizer: Tokenizer, template: ChatTemplate,
                 model: ModelInfo) -> None:
        self.config = config
        self.router = router
        self.tokenizer = tokenizer
        self.template = template
        self.model = model
        self.sampling = ServerSampling(
            defaults=replace(model.defaults, thinking_budget=config.default_thinking_budget),
            vocab_size=model.vocab_size, eos_token_ids=model.eos_token_ids,
            context_length=model.context_length, max_tokens_limit=config.max_tokens_limit)
        self.created = int(time.time())
        self._background: set[asyncio.Task] = set()

    @classmethod
    def from_config(cls, config: GatewayConfig, router: Router) -> Pipeline:
        path = Path(config.model_path)
        tokenizer = Tokenizer.from_dir(path)
        model = ModelInfo.from_dir(path, tokenizer_vocab_size=tokenizer.vocab_size,
                                   eos_token_ids=tokenizer.eos_token_ids, context_length=config.context_length)
        return cls(config, router, tokenizer, ChatTemplate.from_dir(path), model)

    async def close(self) -> None:
        """Let the background Abort calls finish (they are bounded by worker_rpc_timeout)."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=self.config.worker_rpc_timeout)

    # -- RPCs ---------------------------------------------------------------------------------

    async def chat(self, req: gateway_pb2.ChatRequest, client_deadline: float | None
                   ) -> AsyncIterator[gateway_pb2.ChatResponse]:
        progress = _Progress()
        self._check_model(req.model)
        request_id = req.request_id if req.HasField("request_id") and req.request_id else new_request_id()
        chat = convert.chat_input(req)
        try:
            prompt = self.template.render(chat.messages, chat.tools, chat_template_kwargs=chat.template_kwargs)
        except ChatTemplateError as e:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        input_ids = self.tokenizer.encode(prompt)
        convert.check_prompt_length(len(input_ids), self.model.context_length, "messages")
        budget = convert.thinking_budget(
            req.thinking.budget if req.HasField("thinking") and req.thinking.HasField("budget") else None,
            req.custom_logit_processor if req.HasField("custom_logit_processor") else None,
            req.custom_params if req.HasField("custom_params") else None, self.config.enable_custom_logit_processor)
        sampling = convert.worker_sampling(
            req.sampling, self.sampling, prompt_len=len(input_ids), logprobs=req.logprobs,
            top_logprobs=req.top_logprobs, thinking_budget=budget)
        out = ChatOutput.for_request(self.tokenizer, self.config, chat, input_ids,
                                     stops=convert.stop_strings(req.sampling))
        head = gateway_pb2.ChatResponse(id=request_id, model=self.config.model_name, created=int(time.time()))
        collected = gateway_pb2.ChatResponse()  # stream=false: everything goes into one message
        async for chunk in self._tokens(request_id, input_ids, sampling, client_deadline, progress, out):
            for msg in out.messages(chunk):
                if chat.stream:
                    yield _headed(head, msg)
                else:
                    out.merge_into(collected, msg)
        tail = out.final_messages()
        if not chat.stream:
            for msg in tail:
                out.merge_into(collected, msg)
            tail = [collected]
        tail = tail or [gateway_pb2.ChatResponse()]
        apply_finish(tail[-1], out, progress.last, progress.prefill, prompt_tokens=len(input_ids))
        self._observe_finish(progress)
        for msg in tail:
            yield _headed(head, msg)

    async def generate(self, req: gateway_pb2.GenerateRequest, client_deadline: float | None
                       ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        progress = _Progress()
        self._check_model(req.model)
        request_id = req.request_id if req.HasField("request_id") and req.request_id else new_request_id("cmpl-")
        which = req.WhichOneof("input")
        if which == "text":
            input_ids, field_name = self.tokenizer.encode(req.text), "text"
        elif which == "tokens":
            input_ids, field_name = list(req.tokens.ids), "tokens.ids"
            for i, t in enumerate(input_ids):
                if t >= self.model.vocab_size:
                    raise invalid(f"tokens.ids[{i}]", f"must be < vocab size {self.model.vocab_size}, got {t}")
        else:
            raise invalid("input", "must be set: text or tokens")
        convert.check_prompt_length(len(input_ids), self.model.context_length, field_name)
        budget = convert.thinking_budget(
            None, req.custom_logit_processor if req.HasField("custom_logit_processor") else None,
            req.custom_params if req.HasField("custom_params") else None, self.config.enable_custom_logit_processor)
        sampling = convert.worker_sampling(
            req.sampling, self.sampling, prompt_len=len(input_ids), logprobs=req.logprobs,
            top_logprobs=req.top_logprobs, thinking_budget=budget)
        skip = req.skip_special_tokens if req.HasField("skip_special_tokens") else True
        out = TextOutput(self.tokenizer, input_ids, convert.stop_strings(req.sampling), skip_special_tokens=skip)
        stream = req.stream if req.HasField("stream") else True
        collected = gateway_pb2.GenerateResponse(id=request_id, model=self.config.model_name)
        async for chunk in self._tokens(request_id, input_ids, sampling, client_deadline, progress, out):
            msg = out.generate_message(chunk)
            if msg is None:
                continue
            if stream:
                msg.id, msg.model = request_id, self.config.model_name
                yield msg
            else:
                collected.token_ids.extend(msg.token_ids)
                collected.text += msg.text
                collected.logprobs.extend(msg.logprobs)
        final = collected if not stream else gateway_pb2.GenerateResponse(id=request_id, model=self.config.model_name)
        tail = out.flush()
        final.text += tail
        apply_finish(final, out, progress.last, progress.prefill, prompt_tokens=len(input_ids))
        self._observe_finish(progress)
        yield final

    def model_info(self) -> gateway_pb2.GetModelInfoResponse:
        resp = gateway_pb2.GetModelInfoResponse(
            served_model_name=self.config.model_name, model_path=self.config.model_path,
            max_context_length=self.model.context_length, vocab_size=self.model.vocab_size,
            eos_token_ids=self.model.eos_token_ids, tool_call_parser=self.config.tool_call_parser or "",
            reasoning_parser=self.config.reasoning_parser or "",
            max_tokens_limit=self.config.max_tokens_limit or 0)
        spec = next((w.info.spec for w in self.router.decode if w.info is not None), None)
        if spec is not None:
            resp.speculative.algorithm = spec.algorithm
            resp.speculative.num_steps = spec.num_steps
            resp.speculative.eagle_topk = spec.eagle_topk
            resp.speculative.num_draft_tokens = spec.num_draft_tokens
        return resp

    def list_models(self) -> gateway_pb2.ListModelsResponse:
        return gateway_pb2.ListModelsResponse(object="list", data=[gateway_pb2.Model(
            id=self.config.model_name, object="model", created=self.created, owned_by="glmserve",
            root=self.config.model_path, max_model_len=self.model.context_length)])

    # -- helpers ------------------------------------------------------------------------------

    def _check_model(self, model: str) -> None:
        if model and model != self.config.model_name:
            raise GatewayError(grpc.StatusCode.NOT_FOUND,
                               f"model {model!r} is not served here (ListModels: {self.config.model_name!r})")

    def _deadline(self, client_deadline: float | None) -> float:
        own = time.monotonic() + self.config.request_timeout
        return own if client_deadline is None else min(own, client_deadline)

    async def _tokens(self, request_id: str, input_ids: list[int], sampling: worker_pb2.WorkerSampling,
                      client_deadline: float | None, progress: _Progress, out: TextOutput
                      ) -> AsyncIterator[worker_pb2.DecodeChunk]:
        """Decode chunks of the first attempt that produces a token; stops early on a stop string."""
        deadline = self._deadline(client_deadline)
        failed = []
        last_error: LegError | None = None
        for attempt in range(self.config.max_dispatch_attempts):
            try:
                prefill, decode = self.router.choose(exclude=failed)
            except GatewayError:
                if last_error is not None:
                    raise last_error from None
                raise
            leg = LegRequest(request_id, new_transfer_id(), input_ids, sampling, deadline)
            dispatch = Dispatch(prefill, decode, leg, self._background, self.config.worker_rpc_timeout)
            chunks = dispatch.chunks()
            try:
                async for chunk in chunks:
                    self._observe_chunk(progress, chunk)
                    progress.last = chunk
                    yield chunk
                    if out.stopped:  # a stop string ended the text: free both legs now
                        break
                progress.prefill = dispatch.prefill_result
                return
            except LegError as e:
                if e.worker_down:
                    self.router.worker_failed(e.worker, e.message)
                if dispatch.chunks_received or not e.retryable or attempt + 1 == self.config.max_dispatch_attempts:
                    raise
                log.warning("request %s: attempt %d on (%s, %s) failed before the first token: %s; retrying",
                            request_id, attempt + 1, prefill.address, decode.address, e.message)
                failed.append(e.worker)
                last_error = e
            finally:
                await chunks.aclose()

    def _observe_chunk(self, progress: _Progress, chunk: worker_pb2.DecodeChunk) -> None:
        now = time.monotonic()
        if progress.last_chunk is None:
            metrics.ttft_seconds().observe(now - progress.start)
        elif chunk.token_ids:
            metrics.inter_token_latency_seconds().observe((now - progress.last_chunk) / len(chunk.token_ids))
        progress.last_chunk = now

    def _observe_finish(self, progress: _Progress) -> None:
        last = progress.last
        if last is not None and last.spec_verify_steps:
            metrics.spec_accept_length().observe(1 + last.spec_accepted_drafts / last.spec_verify_steps)


def _headed(head: gateway_pb2.ChatResponse, msg: gateway_pb2.ChatResponse) -> gateway_pb2.ChatResponse:
    """`msg` with the response's id, model and created."""
    full = gateway_pb2.ChatResponse()
    full.CopyFrom(head)
    full.MergeFrom(msg)
    return full
