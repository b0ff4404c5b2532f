"""The Pipeline's response messages -> OpenAI JSON: SSE chunk objects and non-stream bodies
(docs/openai_http.md §Responses; shapes of SGLang where SGLang and OpenAI agree).

Chat chunks: a role chunk per choice first (`role`, `content: ""`); every delta carries the
reasoning key (null or text) so `delta.reasoning_content` is always readable in the openai client;
a tool call starts with `{index, id, type, function: {name, arguments: ""}}` and continues with
`{index, function: {arguments}}`; each choice ends with its own finish chunk (empty delta,
`finish_reason`, `matched_stop`); with `stream_options.include_usage` a usage chunk with
`choices: []` comes last. Usage always has `prompt_tokens_details.cached_tokens` and
`completion_tokens_details.reasoning_tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from gateway.errors import GatewayError
from gateway.openai_request import HttpRequest
from protos import gateway_pb2


def usage_json(finals: Sequence[gateway_pb2.ChatResponse | gateway_pb2.GenerateResponse], per_prompt: int) -> dict:
    """Usage of a whole response: each distinct prompt counted once, completions summed over choices."""
    prompt = sum(f.usage.prompt_tokens for k, f in enumerate(finals) if k % per_prompt == 0)
    cached = sum(f.usage.cached_tokens for k, f in enumerate(finals) if k % per_prompt == 0)
    completion = sum(f.usage.completion_tokens for f in finals)
    reasoning = sum(f.usage.reasoning_tokens for f in finals)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning}, "reasoning_tokens": reasoning}


def finish_of(msg: gateway_pb2.ChatResponse | gateway_pb2.GenerateResponse) -> tuple[str, int | str | None]:
    """(finish_reason, matched_stop) of a last message. "abort" is no OpenAI reason: it is an error."""
    fin = msg.finish
    if fin.finish_reason == "abort":
        raise GatewayError(grpc.StatusCode.UNAVAILABLE, "the request was aborted by a worker")
    which = fin.WhichOneof("matched_stop")
    return fin.finish_reason or "stop", (getattr(fin, which) if which else None)


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(lps: Sequence[gateway_pb2.TokenLogprob]) -> dict | None:
    if not lps:
        return None
    return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": _bytes(t.token),
                         "top_logprobs": [{"token": x.token, "logprob": x.logprob, "bytes": _bytes(x.token)}
                                          for x in t.top_logprobs]} for t in lps]}


class ChatFormatter:
    """Chat answers of one HTTP request: chunks as the choices' messages arrive, or one body."""

    def __init__(self, req: HttpRequest, created: int, reasoning_field: str = "reasoning_content") -> None:
        self.req = req
        self.head = {"id": req.request_id, "object": "chat.completion.chunk", "created": created, "model": req.model}
        self._keys = ("reasoning_content", "reasoning") if reasoning_field == "both" else (reasoning_field,)
        n = len(req.calls)
        self.finals: list[gateway_pb2.ChatResponse | None] = [None] * n
        self._held = [""] * n  # reasoning held back while stream_reasoning is false

    def _chunk(self, index: int, delta: dict, finish: str | None = None, **extra: Any) -> dict:
        choice = {"index": index, "delta": delta, "logprobs": extra.pop("logprobs", None), "finish_reason": finish}
        choice.update(extra)
        return {**self.head, "choices": [choice]}

    def _reasoning(self, text: str | None) -> dict:
        return dict.fromkeys(self._keys, text or None)

    def role_chunks(self) -> list[dict]:
        return [self._chunk(i, {"role": "assistant", "content": "", **self._reasoning(None)})
                for i in range(len(self.req.calls))]

    def chunks(self, index: int, msg: gateway_pb2.ChatResponse) -> list[dict]:
        """The SSE chunks of one message of choice `index` (the last one also ends the choice)."""
        d = msg.delta
        finished = msg.HasField("finish")
        reasoning = d.reasoning_content
        if not self.req.stream_reasoning:
            self._held[index] += reasoning
            reasoning = ""
            if d.content or d.tool_calls or finished:
                reasoning, self._held[index] = self._held[index], ""
        content = d.content
        stop = finish_of(msg) if finished else None
        if stop is not None and self.req.no_stop_trim and isinstance(stop[1], str):
            content += stop[1]
        out = []
        if reasoning or content or d.tool_calls or msg.logprobs:
            delta = self._reasoning(reasoning)
            if content:
                delta["content"] = content
            if d.tool_calls:
                delta["tool_calls"] = [_tool_call_delta(tc) for tc in d.tool_calls]
            out.append(self._chunk(index, delta, logprobs=chat_logprobs(msg.logprobs)))
        if stop is not None:
            self.finals[index] = msg
            out.append(self._chunk(index, self._reasoning(None), stop[0], matched_stop=stop[1]))
        return out

    def usage_chunk(self) -> dict:
        return {**self.head, "choices": [], "usage": usage_json(self.finals, len(self.req.calls))}

    def body(self, finals: Sequence[gateway_pb2.ChatResponse]) -> dict:
        """The non-stream answer: one collected message per choice."""
        choices = []
        for i, msg in enumerate(finals):
            reason, matched = finish_of(msg)
            d = msg.delta
            content = d.content + (matched if self.req.no_stop_trim and isinstance(matched, str) else "")
            message: dict[str, Any] = {"role": "assistant",
                                       "content": content or (None if d.tool_calls else ""),
                                       **self._reasoning(d.reasoning_content)}
            if d.tool_calls:
                message["tool_calls"] = [{"id": tc.id, "index": tc.index, "type": "function",
                                          "function": {"name": tc.name, "arguments": tc.arguments}}
                                         for tc in d.tool_calls]
            choices.append({"index": i, "message": message, "logprobs": chat_logprobs(msg.logprobs),
                            "finish_reason": reason, "matched_stop": matched})
        return {"id": self.req.request_id, "object": "chat.completion", "created": self.head["created"],
                "model": self.req.model, "choices": choices, "usage": usage_json(finals, len(finals))}


def _tool_call_delta(tc: gateway_pb2.ToolCallDelta) -> dict:
    if tc.name:
        return {"index": tc.index, "id": tc.id, "type": "function",
                "function": {"name": tc.name, "arguments": tc.arguments}}
    return {"index": tc.index, "function": {"arguments": tc.arguments}}


class CompletionFormatter:
    """/v1/completions answers of one HTTP request (choices: prompt_index * n + i)."""

    def __init__(self, req: HttpRequest, created: int, echo_texts: Sequence[str], per_prompt: int) -> None:
        self.req = req
        self.head = {"id": req.request_id, "object": "text_completion", "created": created, "model": req.model}
        self.echo_texts = list(echo_texts)
        self.per_prompt = per_prompt
        self.finals: list[gateway_pb2.GenerateResponse | None] = [None] * len(req.calls)
        self._offsets = [len(t) if req.echo else 0 for t in self.echo_texts]

    def _chunk(self, index: int, text: str, logprobs: dict | None = None, finish: str | None = None,
               **extra: Any) -> dict:
        return {**self.head, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                          "finish_reason": finish, **extra}]}

    def echo_chunks(self) -> list[dict]:
        return [self._chunk(i, t) for i, t in enumerate(self.echo_texts)] if self.req.echo else []

    def _logprobs(self, index: int, lps: Sequence[gateway_pb2.TokenLogprob]) -> dict | None:
        if self.req.logprobs is None or not lps:
            return None
        offsets = []
        for t in lps:
            offsets.append(self._offsets[index])
            self._offsets[index] += len(t.token)
        top = [{x.token: x.logprob for x in t.top_logprobs} for t in lps] if self.req.logprobs else None
        return {"tokens": [t.token for t in lps], "token_logprobs": [t.logprob for t in lps],
                "top_logprobs": top, "text_offset": offsets}

    def chunks(self, index: int, msg: gateway_pb2.GenerateResponse) -> list[dict]:
        finished = msg.HasField("finish")
        stop = finish_of(msg) if finished else None
        text = msg.text
        if stop is not None and self.req.no_stop_trim and isinstance(stop[1], str):
            text += stop[1]
        out = []
        if text or msg.logprobs:
            out.append(self._chunk(index, text, self._logprobs(index, msg.logprobs)))
        if stop is not None:
            self.finals[index] = msg
            out.append(self._chunk(index, "", None, stop[0], matched_stop=stop[1]))
        return out

    def usage_chunk(self) -> dict:
        return {**self.head, "choices": [], "usage": usage_json(self.finals, self.per_prompt)}

    def body(self, finals: Sequence[gateway_pb2.GenerateResponse]) -> dict:
        choices = []
        for i, msg in enumerate(finals):
            reason, matched = finish_of(msg)
            text = (self.echo_texts[i] if self.req.echo else "") + msg.text
            if self.req.no_stop_trim and isinstance(matched, str):
                text += matched
            choices.append({"index": i, "text": text, "logprobs": self._logprobs(i, msg.logprobs),
                            "finish_reason": reason, "matched_stop": matched})
        return {"id": self.req.request_id, "object": "text_completion", "created": self.head["created"],
                "model": self.req.model, "choices": choices, "usage": usage_json(finals, self.per_prompt)}
