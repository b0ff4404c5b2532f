"""Public request protos -> validated internal values and resolved WorkerSampling.

Presence-aware: an absent sampling field takes the model default (generation_config.json, else
the server default); a present value is taken literally (temperature 0 = greedy). Every
validation error is INVALID_ARGUMENT naming the field ("sampling.top_p must be in (0, 1]").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from common.serving.custom_processor import CustomProcessorError, resolve_custom_processor
from gateway.errors import GatewayError, invalid
from gateway.model_info import ModelInfo
from protos import gateway_pb2, worker_pb2

ROLES = ("system", "user", "assistant", "tool")
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Limits:
    context_length: int
    vocab_size: int
    max_tokens_limit: int | None = None
    enable_custom_logit_processor: bool = False
    default_thinking_budget: int | None = None


@dataclass(frozen=True)
class ChatInput:
    """What the chat template and the parsers need from a ChatRequest."""
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None  # shown to the model (None: no tools in the prompt)
    parse_tools: bool                   # run the tool-call parser on the output
    template_kwargs: dict[str, Any]
    separate_reasoning: bool
    stream: bool


# ---------------------------------------------------------------------------------------------
# Chat request


def struct_to_dict(s: struct_pb2.Struct) -> dict[str, Any]:
    """Struct -> dict, with integral numbers back to int (Struct stores every number as a double,
    and a JSON schema's `"minimum": 1` must not render as `1.0` in the prompt)."""
    return _ints(json_format.MessageToDict(s))


def _ints(v: Any) -> Any:
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return int(v)
    if isinstance(v, dict):
        return {k: _ints(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_ints(x) for x in v]
    return v


def chat_messages(req: gateway_pb2.ChatRequest) -> list[dict[str, Any]]:
    if not req.messages:
        raise invalid("messages", "must not be empty")
    out = []
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        role = m.role.strip().lower()
        if role not in ROLES:
            raise invalid(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {m.role!r}")
        msg: dict[str, Any] = {"role": role, "content": m.content}
        if m.HasField("reasoning_content"):
            if role != "assistant":
                raise invalid(f"{where}.reasoning_content", "is only allowed on assistant messages")
            msg["reasoning_content"] = m.reasoning_content
        if m.tool_calls:
            if role != "assistant":
                raise invalid(f"{where}.tool_calls", "are only allowed on assistant messages")
            msg["tool_calls"] = [_history_tool_call(tc, f"{where}.tool_calls[{j}]")
                                 for j, tc in enumerate(m.tool_calls)]
        if role == "tool":
            msg["tool_call_id"] = m.tool_call_id
        if m.name:
            msg["name"] = m.name
        out.append(msg)
    return out


def _history_tool_call(tc: gateway_pb2.ToolCall, where: str) -> dict[str, Any]:
    if tc.type not in ("", "function"):
        raise invalid(f"{where}.type", f"must be \"function\", got {tc.type!r}")
    if not tc.function.name:
        raise invalid(f"{where}.function.name", "must not be empty")
    try:
        args = json.loads(tc.function.arguments or "{}")
    except json.JSONDecodeError as e:
        raise invalid(f"{where}.function.arguments", f"must be valid JSON: {e}") from None
    if not isinstance(args, dict):
        raise invalid(f"{where}.function.arguments", "must be a JSON object")
    return {"id": tc.id, "type": "function", "function": {"name": tc.function.name, "arguments": args}}


def chat_tools(req: gateway_pb2.ChatRequest) -> tuple[list[dict[str, Any]] | None, bool]:
    """(tools for the template, whether to parse tool calls) after tool_choice."""
    tools = []
    names = set()
    for i, t in enumerate(req.tools):
        if t.type not in ("", "function"):
            raise invalid(f"tools[{i}].type", f"must be \"function\", got {t.type!r}")
        f = t.function
        if not f.name:
            raise invalid(f"tools[{i}].function.name", "must not be empty")
        if f.name in names:
            raise invalid(f"tools[{i}].function.name", f"{f.name!r} is declared twice")
        names.add(f.name)
        fn: dict[str, Any] = {"name": f.name}
        if f.description:
            fn["description"] = f.description
        fn["parameters"] = struct_to_dict(f.parameters) if f.HasField("parameters") else \
            {"type": "object", "properties": {}}
        if f.HasField("strict"):
            fn["strict"] = f.strict
        tools.append({"type": "function", "function": fn})
    choice = req.tool_choice
    which = choice.WhichOneof("choice") if req.HasField("tool_choice") else None
    if which == "mode" and choice.mode == gateway_pb2.TOOL_CHOICE_NONE:
        return None, False
    if which == "function":
        chosen = [t for t in tools if t["function"]["name"] == choice.function.name]
        if not chosen:
            raise invalid("tool_choice.function.name", f"{choice.function.name!r} is not in tools")
        tools = chosen
    elif which == "mode" and choice.mode == gateway_pb2.TOOL_CHOICE_REQUIRED and not tools:
        raise invalid("tool_choice", "is REQUIRED but no tools were given")
    return (tools or None), bool(tools)


def template_kwargs(req: gateway_pb2.ChatRequest) -> dict[str, Any]:
    kwargs = struct_to_dict(req.chat_template_kwargs) if req.HasField("chat_template_kwargs") else {}
    if req.HasField("thinking") and req.thinking.HasField("enabled"):
        given = kwargs.get("enable_thinking")
        if given is not None and bool(given) != req.thinking.enabled:
            raise invalid("thinking.enabled", "conflicts with chat_template_kwargs.enable_thinking")
        kwargs["enable_thinking"] = req.thinking.enabled
    return kwargs


def chat_input(req: gateway_pb2.ChatRequest) -> ChatInput:
    tools, parse_tools = chat_tools(req)
    return ChatInput(
        messages=chat_messages(req),
        tools=tools,
        parse_tools=parse_tools,
        template_kwargs=template_kwargs(req),
        separate_reasoning=req.separate_reasoning if req.HasField("separate_reasoning") else True,
        stream=req.stream if req.HasField("stream") else True,
    )


# ---------------------------------------------------------------------------------------------
# Thinking budget


def thinking_budget(requested: int | None, processor: str | None, custom_params: struct_pb2.Struct | None,
                    limits: Limits) -> int | None:
    """Effective budget: the request's (native `thinking.budget` or SGLang's custom processor with
    custom_params.thinking_budget), capped by --default-thinking-budget (which alone applies when
    the request sets none)."""
    budgets = []
    if requested is not None:
        if requested < 0:
            raise invalid("thinking.budget", "must be >= 0")
        budgets.append(requested)
    if processor:
        try:  # read without unpickling; the only built-in processor is the thinking budget
            resolve_custom_processor(processor, limits.enable_custom_logit_processor)
        except CustomProcessorError as e:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        params = struct_to_dict(custom_params) if custom_params is not None else {}
        value = params.get("thinking_budget")
        if value is not None:  # SGLang: a missing budget makes the processor a no-op
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise invalid("custom_params.thinking_budget", f"must be an integer >= 0, got {value!r}")
            budgets.append(value)
    if limits.default_thinking_budget is not None:
        budgets.append(limits.default_thinking_budget)
    return min(budgets) if budgets else None


# ---------------------------------------------------------------------------------------------
# Sampling


def check_prompt_length(prompt_len: int, limits: Limits, field: str) -> None:
    if prompt_len == 0:
        raise invalid(field, "renders to an empty prompt")
    if prompt_len >= limits.context_length:
        raise invalid(field, f"is {prompt_len} tokens; the maximum context length is "
                             f"{limits.context_length} (prompt + at least one new token)")


def stop_strings(params: gateway_pb2.SamplingParams, prefix: str = "sampling") -> tuple[str, ...]:
    for i, s in enumerate(params.stop):
        if not s:
            raise invalid(f"{prefix}.stop[{i}]", "must not be empty")
    return tuple(dict.fromkeys(params.stop))


def resolve_sampling(
    params: gateway_pb2.SamplingParams,
    *,
    model: ModelInfo,
    limits: Limits,
    prompt_len: int,
    logprobs: bool = False,
    top_logprobs: int | None = None,
    thinking_budget: int | None = None,
    prefix: str = "sampling",
) -> worker_pb2.WorkerSampling:
    """Validate `params` and resolve every default; the worker applies the result as is."""
    d = model.defaults

    def get(name: str, default: Any) -> Any:
        return getattr(params, name) if params.HasField(name) else default

    def finite(name: str, value: float) -> float:
        if not math.isfinite(value):
            raise invalid(f"{prefix}.{name}", "must be a finite number")
        return value

    temperature = finite("temperature", get("temperature", d.temperature))
    if temperature < 0:
        raise invalid(f"{prefix}.temperature", f"must be >= 0 (0 = greedy), got {temperature:g}")
    top_p = finite("top_p", get("top_p", d.top_p))
    if not 0 < top_p <= 1:
        raise invalid(f"{prefix}.top_p", f"must be in (0, 1], got {top_p:g}")
    top_k = get("top_k", d.top_k)
    if top_k < -1:
        raise invalid(f"{prefix}.top_k", f"must be >= 1, or 0 / -1 for off, got {top_k}")
    top_k = max(top_k, 0)
    min_p = finite("min_p", get("min_p", d.min_p))
    if not 0 <= min_p <= 1:
        raise invalid(f"{prefix}.min_p", f"must be in [0, 1], got {min_p:g}")
    freq = finite("frequency_penalty", get("frequency_penalty", 0.0))
    pres = finite("presence_penalty", get("presence_penalty", 0.0))
    for name, v in (("frequency_penalty", freq), ("presence_penalty", pres)):
        if not -2 <= v <= 2:
            raise invalid(f"{prefix}.{name}", f"must be in [-2, 2], got {v:g}")
    rep = finite("repetition_penalty", get("repetition_penalty", d.repetition_penalty))
    if rep <= 0:
        raise invalid(f"{prefix}.repetition_penalty", f"must be > 0 (1 = off), got {rep:g}")

    room = limits.context_length - prompt_len
    cap = room if limits.max_tokens_limit is None else min(room, limits.max_tokens_limit)
    if params.HasField("max_tokens"):
        max_tokens = params.max_tokens
        if max_tokens < 1:
            raise invalid(f"{prefix}.max_tokens", f"must be >= 1, got {max_tokens}")
        if limits.max_tokens_limit is not None and max_tokens > limits.max_tokens_limit:
            raise invalid(f"{prefix}.max_tokens", f"must be <= {limits.max_tokens_limit} (the server's "
                                                  f"--max-tokens-limit), got {max_tokens}")
        if max_tokens > room:
            raise invalid(f"{prefix}.max_tokens", f"({max_tokens}) + prompt length ({prompt_len}) exceeds the "
                                                  f"maximum context length {limits.context_length}")
    else:
        max_tokens = cap
    min_tokens = get("min_tokens", 0)
    if not 0 <= min_tokens <= max_tokens:
        raise invalid(f"{prefix}.min_tokens", f"must be in [0, max_tokens={max_tokens}], got {min_tokens}")

    for i, t in enumerate(params.stop_token_ids):
        if t >= limits.vocab_size:
            raise invalid(f"{prefix}.stop_token_ids[{i}]", f"must be < vocab size {limits.vocab_size}, got {t}")
    for tok, bias in params.logit_bias.items():
        if not 0 <= tok < limits.vocab_size:
            raise invalid(f"{prefix}.logit_bias", f"key {tok} is not a token id (vocab size {limits.vocab_size})")
        if not (math.isfinite(bias) and -100 <= bias <= 100):
            raise invalid(f"{prefix}.logit_bias[{tok}]", f"must be in [-100, 100], got {bias:g}")
    ignore_eos = get("ignore_eos", False)
    stop_ids = list(dict.fromkeys([*params.stop_token_ids, *(() if ignore_eos else model.eos_token_ids)]))

    n_top = 0
    if top_logprobs is not None:
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise invalid("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}")
        if top_logprobs and not logprobs:
            raise invalid("top_logprobs", "needs logprobs: true")
        n_top = top_logprobs

    ws = worker_pb2.WorkerSampling(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        frequency_penalty=freq, presence_penalty=pres, repetition_penalty=rep,
        min_tokens=min_tokens, max_tokens=max_tokens, stop_token_ids=stop_ids, ignore_eos=ignore_eos,
        logprobs=logprobs, top_logprobs=n_top,
    )
    ws.logit_bias.update(dict(params.logit_bias))
    if params.HasField("seed"):
        ws.seed = params.seed
    if thinking_budget is not None:
        ws.thinking_budget = thinking_budget
    return ws
