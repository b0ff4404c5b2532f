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
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

from common.serving import metrics
from common.serving.ids import new_request_id, new_transfer_id
from common.serving.sampling_params import ServerSampling
from gateway import checks, constraints
from gateway.calls import ChatCall, Constraint, GenerateCall, PromptCache, Sampling
from gateway.chat_output import ChatOutput, TextOutput, apply_finish
from gateway.chat_template import ChatTemplate, ChatTemplateError
from gateway.config import GatewayConfig
from gateway.errors import GatewayError, invalid
from gateway.model_info import ModelInfo
from gateway.router import Router
from gateway.tokenizer import Tokenizer, TokenizerError
from gateway.worker_client import Dispatch, LegError, LegRequest
from protos import gateway_pb2, worker_pb2

log = logging.getLogger(__name__)
Finished = gateway_pb2.ChatResponse | gateway_pb2.GenerateResponse  # a response's last message (finish, usage)


@dataclass
class _Progress:
    """What the dispatch loop learned, for usage and metrics."""
    start: float = field(default_factory=time.monotonic)
    last_chunk: float | None = None
    first_chunk: float | None = None
    prefill: worker_pb2.PrefillResult | None = None
    last: worker_pb2.DecodeChunk | None = None


class Admission:
    """The gateway-wide cap on sequences running at once (--max-concurrent-requests; 0: none), one
    count for both APIs. A public request takes its slots before any work and gives them back when
    it ends, however it ends (finished, refused, failed, cancelled, client gone): `slots` is a
    context manager around the whole response. Over the cap: RESOURCE_EXHAUSTED (HTTP 429)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.running = 0  # one event loop: no lock

    @contextmanager
    def slots(self, count: int = 1) -> Iterator[None]:
        if self.limit and self.running + count > self.limit:
            raise GatewayError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the gateway is running its maximum of {self.limit} concurrent requests "
                               f"(--max-concurrent-requests); retry later", None, "server_overloaded")
        self.running += count
        try:
            yield
        finally:
            self.running -= count


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
        self.limits = replace(config.request_limits, max_prompt_chars=config.max_prompt_chars
                              or checks.PROMPT_CHARS_PER_TOKEN * model.context_length)
        self.admission = Admission(config.max_concurrent_requests)
        self.created = int(time.time())
        self.inflight: set[str] = set()  # request ids running now
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

    async def chat(self, call: ChatCall, client_deadline: float | None
                   ) -> AsyncIterator[gateway_pb2.ChatResponse]:
        progress = _Progress()
        self._check_model(call.model)
        request_id = call.request_id or new_request_id()
        try:
            prompt = self.template.render(call.messages, call.tools, chat_template_kwargs=call.template_kwargs)
        except ChatTemplateError as e:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, str(e), _template_field(e)) from None
        checks.check_prompt_chars(len(prompt), self.limits.max_prompt_chars, "messages")
        input_ids = self.tokenizer.encode(prompt)
        checks.check_prompt_length(len(input_ids), self.model.context_length, "messages")
        reasoning_first = call.template_kwargs.get("enable_thinking") is not False
        constraint = call.sampling.constraint or constraints.tool_constraint(call, self.config.tool_call_parser)
        forced = self._forced_prefix(call) if constraint is None else ()
        sampling = self._sampling(call.sampling, len(input_ids), forced, reasoning_first=reasoning_first,
                                  constraint=constraint)
        out = ChatOutput.for_request(self.tokenizer, self.config, call, input_ids, stops=call.sampling.stop)
        head = gateway_pb2.ChatResponse(id=request_id, model=self.config.model_name, created=int(time.time()))
        collected = gateway_pb2.ChatResponse()  # stream=false: everything goes into one message
        async with self._request(request_id, "chat", input_ids, sampling, progress) as finished:
            async for chunk in self._tokens(request_id, input_ids, sampling, client_deadline, progress, out,
                                            constraint, call.prompt_cache):
                for msg in out.messages(chunk):
                    if call.stream:
                        yield _headed(head, msg)
                    else:
                        out.merge_into(collected, msg)
            answer_known = not reasoning_first or out.counts_reasoning
            self._check_constraint_applied(request_id, constraint, progress, out.reasoning_tokens, answer_known)
            tail = out.final_messages()
            if not call.stream:
                for msg in tail:
                    out.merge_into(collected, msg)
                tail = [collected]
            tail = tail or [gateway_pb2.ChatResponse()]
            apply_finish(tail[-1], out, progress.last, progress.prefill, prompt_tokens=len(input_ids))
            finished(tail[-1])
            for msg in tail:
                yield _headed(head, msg)

    async def generate(self, call: GenerateCall, client_deadline: float | None
                       ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        progress = _Progress()
        self._check_model(call.model)
        request_id = call.request_id or new_request_id("cmpl-")
        if call.token_ids is not None:
            input_ids = list(call.token_ids)
            checks.check_prompt_length(len(input_ids), self.model.context_length, call.input_field)
            for i, t in enumerate(input_ids):
                if t >= self.model.vocab_size or t < 0:
                    raise invalid(f"{call.input_field}[{i}]", f"must be < vocab size {self.model.vocab_size} "
                                                              f"and >= 0, got {t}")
        elif call.text is not None:
            checks.check_prompt_chars(len(call.text), self.limits.max_prompt_chars, call.input_field)
            input_ids = self.tokenizer.encode(call.text)
        else:
            raise invalid(call.input_field, "must be set")
        checks.check_prompt_length(len(input_ids), self.model.context_length, call.input_field)
        constraint = call.sampling.constraint
        sampling = self._sampling(call.sampling, len(input_ids), constraint=constraint)
        out = TextOutput(self.tokenizer, input_ids, call.sampling.stop, skip_special_tokens=call.skip_special_tokens)
        collected = gateway_pb2.GenerateResponse(id=request_id, model=self.config.model_name)
        async with self._request(request_id, "generate", input_ids, sampling, progress) as finished:
            async for chunk in self._tokens(request_id, input_ids, sampling, client_deadline, progress, out,
                                            constraint, call.prompt_cache):
                msg = out.generate_message(chunk)
                if msg is None:
                    continue
                if call.stream:
                    msg.id, msg.model = request_id, self.config.model_name
                    yield msg
                else:
                    collected.token_ids.extend(msg.token_ids)
                    collected.text += msg.text
                    collected.logprobs.extend(msg.logprobs)
            self._check_constraint_applied(request_id, constraint, progress, 0, True)
            final = collected if not call.stream else \
                gateway_pb2.GenerateResponse(id=request_id, model=self.config.model_name)
            final.text += out.flush()
            apply_finish(final, out, progress.last, progress.prefill, prompt_tokens=len(input_ids))
            finished(final)
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
                               f"model {model!r} is not served here (ListModels: {self.config.model_name!r})",
                               "model", "model_not_found")

    def _sampling(self, s: Sampling, prompt_len: int, forced_prefix: tuple[int, ...] = (), *,
                  reasoning_first: bool = False, constraint: Constraint | None = None) -> worker_pb2.WorkerSampling:
        budget = checks.thinking_budget(s, self.config.enable_custom_logit_processor)
        return checks.worker_sampling(s, self.sampling, prompt_len=prompt_len, thinking_budget=budget,
                                      forced_prefix=forced_prefix, reasoning_first=reasoning_first,
                                      grammar=None if constraint is None else constraint.grammar)

    def _check_constraint_applied(self, request_id: str, constraint: Constraint | None, progress: _Progress,
                                  reasoning_tokens: int, answer_known: bool) -> None:
        if constraint is None:
            return
        answer = (progress.last.completion_tokens if progress.last is not None else 0) - reasoning_tokens
        try:
            constraints.check_applied(constraint, progress.last, progress.prefill, answer, answer_known)
        except GatewayError:
            log.error("request %s: %d answer tokens came back without the %s constraint applied", request_id,
                      answer, constraint.grammar.kind)
            raise

    def _forced_prefix(self, call: ChatCall) -> tuple[int, ...]:
        """tool_choice "required" without a tool-call grammar (no GLM tool-call parser configured): the
        answer after reasoning begins with <tool_call>; a named tool: with <tool_call> and its name.
        Decoding enforces it (common.sampling ForcedPrefix)."""
        if call.tool_choice not in ("required", "named"):
            return ()
        try:
            start = self.tokenizer.token_id("<tool_call>")
        except TokenizerError:
            raise invalid("tool_choice", "cannot be enforced: the tokenizer has no <tool_call> token") from None
        if call.tool_choice == "required":
            return (start,)
        return (start, *self.tokenizer.encode(call.tools[0]["function"]["name"]))

    @asynccontextmanager
    async def _request(self, request_id: str, kind: str, input_ids: list[int], sampling: worker_pb2.WorkerSampling,
                       progress: _Progress) -> AsyncIterator[Callable[[Finished], None]]:
        """One in-flight request: its id is unique while it runs (ALREADY_EXISTS otherwise); a
        DEBUG line when it starts and one INFO line when it ends (id, tokens, TTFT, duration, finish)."""
        if request_id in self.inflight:
            raise GatewayError(grpc.StatusCode.ALREADY_EXISTS,
                               f"request_id {request_id!r} is already in flight", "request_id")
        self.inflight.add(request_id)
        log.debug("request %s: %s, %d prompt tokens, max_tokens %d, temperature %g", request_id, kind,
                  len(input_ids), sampling.max_tokens, sampling.temperature)
        result: list[Finished] = []
        outcome = "failed"
        try:
            yield result.append
            outcome = "done"
        except (asyncio.CancelledError, GeneratorExit):  # the client left (or closed the stream early)
            outcome = "cancelled"
            raise
        except GatewayError as e:
            outcome = f"failed {e.code.name}"
            raise
        finally:
            self.inflight.discard(request_id)
            self._observe_finish(progress)
            _log_request(request_id, len(input_ids), progress, result[0] if result else None, outcome)

    def _deadline(self, client_deadline: float | None) -> float:
        own = time.monotonic() + self.config.request_timeout
        return own if client_deadline is None else min(own, client_deadline)

    async def _tokens(self, request_id: str, input_ids: list[int], sampling: worker_pb2.WorkerSampling,
                      client_deadline: float | None, progress: _Progress, out: TextOutput,
                      constraint: Constraint | None, prompt_cache: PromptCache
                      ) -> AsyncIterator[worker_pb2.DecodeChunk]:
        """`_attempts`, with a worker's refusal of the grammar renamed to the public field."""
        try:
            async for chunk in self._attempts(request_id, input_ids, sampling, client_deadline, progress, out,
                                              prompt_cache):
                yield chunk
        except LegError as e:
            refusal = constraints.worker_refusal(e, constraint)
            if refusal is e:
                raise
            raise refusal from None

    async def _attempts(self, request_id: str, input_ids: list[int], sampling: worker_pb2.WorkerSampling,
                        client_deadline: float | None, progress: _Progress, out: TextOutput,
                        prompt_cache: PromptCache) -> AsyncIterator[worker_pb2.DecodeChunk]:
        """Decode chunks of the first attempt that produces a token; stops early on a stop string."""
        deadline = self._deadline(client_deadline)
        failed = []
        last_error: LegError | None = None
        allow_local = True
        for attempt in range(self.config.max_dispatch_attempts):
            try:
                route = self.router.route(input_ids, exclude=failed, allow_local=allow_local,
                                          routing_key=prompt_cache.routing_key, salt=prompt_cache.salt)
            except GatewayError:
                if last_error is not None:
                    raise last_error from None
                raise
            leg = LegRequest(request_id, new_transfer_id(), input_ids, sampling, deadline,
                             uncached_tokens=len(input_ids) - route.cached_tokens, cache_salt=prompt_cache.salt)
            dispatch = Dispatch(route.prefill, route.decode, leg, self._background, self.config.worker_rpc_timeout)
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
                            request_id, attempt + 1, route.prefill.address if route.prefill else "local prefill",
                            route.decode.address, e.message)
                if route.prefill is None and e.code == grpc.StatusCode.FAILED_PRECONDITION:
                    allow_local = False  # the decode worker no longer holds the prefix: the normal PD path
                else:
                    failed.append(e.worker)
                last_error = e
            finally:
                await chunks.aclose()

    def _observe_chunk(self, progress: _Progress, chunk: worker_pb2.DecodeChunk) -> None:
        now = time.monotonic()
        if progress.last_chunk is None:
            progress.first_chunk = now
            metrics.ttft_seconds().observe(now - progress.start)
        elif chunk.token_ids:
            metrics.inter_token_latency_seconds().observe((now - progress.last_chunk) / len(chunk.token_ids))
        progress.last_chunk = now

    def _observe_finish(self, progress: _Progress) -> None:
        last = progress.last
        if last is not None and last.spec_verify_steps:
            metrics.spec_accept_length().observe(1 + last.spec_accepted_drafts / last.spec_verify_steps)


def _template_field(e: ChatTemplateError) -> str:
    return e.field if e.message_index is None else f"messages[{e.message_index}].{e.field}".rstrip(".")


def _log_request(request_id: str, prompt_tokens: int, progress: _Progress, final: Finished | None,
                 outcome: str) -> None:
    now = time.monotonic()
    ttft = "-" if progress.first_chunk is None else f"{progress.first_chunk - progress.start:.3f}s"
    if final is None:
        log.info("request %s %s: prompt %d tokens, ttft %s, %.3fs", request_id, outcome, prompt_tokens, ttft,
                 now - progress.start)
        return
    u = final.usage
    log.info("request %s finished: prompt %d tokens (%d cached), output %d tokens (%d reasoning), ttft %s, "
             "%.3fs, finish %s", request_id, u.prompt_tokens, u.cached_tokens, u.completion_tokens,
             u.reasoning_tokens, ttft, now - progress.start, final.finish.finish_reason)


def _headed(head: gateway_pb2.ChatResponse, msg: gateway_pb2.ChatResponse) -> gateway_pb2.ChatResponse:
    """`msg` with the response's id, model and created."""
    full = gateway_pb2.ChatResponse()
    full.CopyFrom(head)
    full.MergeFrom(msg)
    return full
