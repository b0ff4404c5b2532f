"""Per-request output state: token ids in, text (Generate) or typed chat deltas (Chat) out.

Token ids -> IncrementalDetokenizer -> StopStringMatcher -> (Chat only) StreamingChatParser
(reasoning first, then tool calls). A stop token that ends the request is counted but never
decoded; a stop string is never emitted and ends the text at once (`stopped`).

Chat deltas keep their order: one ChatResponse holds reasoning, then content, then tool-call
fragments; a delta that would break that order (content after a tool call, ...) starts a new
message. Reasoning tokens are counted by token id: in reasoning (forced, or the output opened
with <think>) every token up to and including the first </think> counts; a <tool_call> token ends
reasoning without counting.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.calls import ChatCall
from gateway.config import GatewayConfig
from gateway.parsers import (
    ChatDelta,
    ContentDelta,
    ReasoningDelta,
    StreamingChatParser,
    ToolCallArgs,
    ToolCallStart,
    get_parsers,
)
from gateway.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer, TokenizerError
from protos import gateway_pb2, worker_pb2

# Special tokens the parsers read; every other special token (eos, turn markers) is skipped.
MARKUP_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>",
                 "<arg_value>", "</arg_value>")
_RANK = {ReasoningDelta: 0, ContentDelta: 1, ToolCallStart: 2, ToolCallArgs: 2}


class TextOutput:
    """Detokenize + stop strings. Used as is by Generate; the base of ChatOutput."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stops: Sequence[str], *,
                 skip_special_tokens: bool = True, keep: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens,
                                             keep=keep)
        self._stops = StopStringMatcher(stops)
        self.matched_stop: str | None = None
        self.consumed = 0           # output tokens taken (up to the one completing a stop string)
        self.reasoning_tokens = 0
        self.tool_calls_returned = False

    @property
    def stopped(self) -> bool:
        return self.matched_stop is not None

    def _decodable(self, chunk: worker_pb2.DecodeChunk) -> tuple[list[int], int]:
        """(ids to decode, ids to count): a finishing stop token is counted, never decoded."""
        ids = list(chunk.token_ids)
        if chunk.HasField("finish") and chunk.finish.HasField("token_id") and ids and ids[-1] == chunk.finish.token_id:
            return ids[:-1], len(ids)
        return ids, len(ids)

    def _text(self, token_id: int | None) -> str:
        """Feed one token (None: end of stream) through detokenizer and stop matcher."""
        raw = self._detok.feed([token_id]) if token_id is not None else self._detok.finish()
        text, matched = self._stops.feed(raw)
        if matched is not None:
            self.matched_stop = matched
        elif token_id is None:
            text += self._stops.finish()
        return text

    def generate_message(self, chunk: worker_pb2.DecodeChunk) -> gateway_pb2.GenerateResponse | None:
        if self.stopped:
            return None
        ids, count = self._decodable(chunk)
        msg = gateway_pb2.GenerateResponse()
        taken = count
        for k, tid in enumerate(ids):
            msg.text += self._text(tid)
            if self.stopped:
                taken = k + 1
                break
        msg.token_ids.extend(chunk.token_ids[:taken])
        self.consumed += taken
        _add_logprobs(self.tokenizer, msg.logprobs, chunk.logprobs[:taken])
        return msg

    def flush(self) -> str:
        return "" if self.stopped else self._text(None)


class ChatOutput(TextOutput):
    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stops: Sequence[str],
                 parser: StreamingChatParser, *, count_reasoning: bool, force_reasoning: bool) -> None:
        keep = [t for t in MARKUP_TOKENS if _has_token(tokenizer, t)]
        super().__init__(tokenizer, prompt_ids, stops, skip_special_tokens=True, keep=keep)
        self._parser = parser
        self._count_reasoning = count_reasoning
        self._in_reasoning = force_reasoning
        self._first_token = True
        self._ids = {t: tokenizer.token_id(t) for t in ("<think>", "</think>", "<tool_call>") if t in keep}

    @property
    def counts_reasoning(self) -> bool:
        """Whether `reasoning_tokens` counts the reasoning (a reasoning parser is configured)."""
        return self._count_reasoning

    @classmethod
    def for_request(cls, tokenizer: Tokenizer, config: GatewayConfig, chat: ChatCall,
                    prompt_ids: Sequence[int], stops: Sequence[str]) -> ChatOutput:
        force = chat.template_kwargs.get("enable_thinking") is not False
        reasoning_name = config.reasoning_parser if chat.separate_reasoning else None
        tool, reasoning = get_parsers(config.tool_call_parser if chat.parse_tools else None, reasoning_name,
                                      chat.tools, force, stream_arguments=chat.stream)
        return cls(tokenizer, prompt_ids, stops, StreamingChatParser(tool, reasoning),
                   count_reasoning=config.reasoning_parser is not None, force_reasoning=force)

    def messages(self, chunk: worker_pb2.DecodeChunk) -> list[gateway_pb2.ChatResponse]:
        """The chunk's deltas as ordered partial messages (id/model/finish are added by the caller)."""
        if self.stopped:
            return []
        ids, count = self._decodable(chunk)
        taken = count
        deltas: list[ChatDelta] = []
        for k, tid in enumerate(ids):
            self._count(tid)
            deltas += self._parse(self._text(tid))
            if self.stopped:
                taken = k + 1
                deltas += self._parser.finish()
                break
        if taken == count and count > len(ids):
            self._count(chunk.token_ids[-1])
        self.consumed += taken
        msgs = self._group(deltas)
        if chunk.logprobs and taken:
            if not msgs:
                msgs.append(gateway_pb2.ChatResponse())
            _add_logprobs(self.tokenizer, msgs[0].logprobs, chunk.logprobs[:taken])
        return msgs

    def final_messages(self) -> list[gateway_pb2.ChatResponse]:
        deltas: list[ChatDelta] = []
        if not self.stopped:
            deltas += self._parse(self._text(None))
            deltas += self._parser.finish()
        return self._group(deltas)

    def _parse(self, text: str) -> list[ChatDelta]:
        return self._parser.feed(text) if text else []

    def _count(self, token_id: int) -> None:
        first, self._first_token = self._first_token, False
        if not self._count_reasoning:
            return
        if first and not self._in_reasoning and token_id == self._ids.get("<think>"):
            self._in_reasoning = True
        if not self._in_reasoning:
            return
        if token_id == self._ids.get("<tool_call>"):
            self._in_reasoning = False
            return
        self.reasoning_tokens += 1
        if token_id == self._ids.get("</think>"):
            self._in_reasoning = False

    def _group(self, deltas: list[ChatDelta]) -> list[gateway_pb2.ChatResponse]:
        msgs: list[gateway_pb2.ChatResponse] = []
        rank = 3
        for d in deltas:
            r = _RANK[type(d)]
            if not msgs or r < rank:
                msgs.append(gateway_pb2.ChatResponse())
            rank = r
            delta = msgs[-1].delta
            if isinstance(d, ReasoningDelta):
                delta.reasoning_content += d.text
            elif isinstance(d, ContentDelta):
                delta.content += d.text
            elif isinstance(d, ToolCallStart):
                self.tool_calls_returned = True
                delta.tool_calls.add(index=d.index, id=d.id, name=d.name)
            elif delta.tool_calls and delta.tool_calls[-1].index == d.index:
                delta.tool_calls[-1].arguments += d.fragment
            else:
                delta.tool_calls.add(index=d.index, arguments=d.fragment)
        return msgs

    @staticmethod
    def merge_into(collected: gateway_pb2.ChatResponse, msg: gateway_pb2.ChatResponse) -> None:
        """Accumulate `msg` into the single message of a stream=false answer (one entry per call)."""
        collected.delta.reasoning_content += msg.delta.reasoning_content
        collected.delta.content += msg.delta.content
        calls = {c.index: c for c in collected.delta.tool_calls}
        for tc in msg.delta.tool_calls:
            if tc.index not in calls:
                calls[tc.index] = collected.delta.tool_calls.add(index=tc.index)
            c = calls[tc.index]
            c.id = c.id or tc.id
            c.name = c.name or tc.name
            c.arguments += tc.arguments
        collected.logprobs.extend(msg.logprobs)


def apply_finish(msg: gateway_pb2.ChatResponse | gateway_pb2.GenerateResponse, out: TextOutput,
                 last: worker_pb2.DecodeChunk | None, prefill: worker_pb2.PrefillResult | None,
                 prompt_tokens: int) -> None:
    """Set `finish` and `usage` on the last message of a response."""
    fin = msg.finish
    if out.matched_stop is not None:
        fin.finish_reason = "stop"
        fin.stop_str = out.matched_stop
    elif last is not None and last.HasField("finish"):
        fin.finish_reason = last.finish.reason or "stop"
        if last.finish.HasField("token_id"):
            fin.token_id = last.finish.token_id
    else:
        fin.finish_reason = "abort"
    if out.tool_calls_returned and fin.finish_reason == "stop":
        fin.finish_reason = "tool_calls"
        fin.ClearField("matched_stop")
    u = msg.usage
    u.prompt_tokens = prompt_tokens
    u.completion_tokens = out.consumed
    u.reasoning_tokens = out.reasoning_tokens
    u.cached_tokens = prefill.cached_tokens if prefill is not None else 0
    if last is not None and last.spec_verify_steps:
        u.spec_verify_steps = last.spec_verify_steps
        u.spec_accept_length = 1 + last.spec_accepted_drafts / last.spec_verify_steps


def _add_logprobs(tokenizer: Tokenizer, dst, src: Sequence[worker_pb2.TokenLogprob]) -> None:
    for lp in src:
        t = dst.add(token_id=lp.token_id, logprob=lp.logprob, token=tokenizer.decode([lp.token_id]))
        for tid, tlp in zip(lp.top_ids, lp.top_logprobs):
            t.top_logprobs.add(token_id=tid, logprob=tlp, token=tokenizer.decode([tid]))


def _has_token(tokenizer: Tokenizer, text: str) -> bool:
    try:
        tokenizer.token_id(text)
        return True
    except TokenizerError:
        return False
