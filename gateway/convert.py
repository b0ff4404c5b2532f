"""Public request protos -> validated internal values and resolved WorkerSampling.

Sampling is resolved and validated by SamplingParams (common/serving/sampling_params.py), the same
code the workers check the wire with: an absent field takes the model default (generation_config.json,
else the server default), a present value is taken literally (temperature 0 = greedy). Every
validation error is INVALID_ARGUMENT naming the field ("sampling.top_p must be in (0, 1], got 2").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from common.serving.custom_processor import CustomProcessorError, resolve_custom_processor
from common.serving.sampling_params import INT32_MAX, SamplingError, SamplingParams, ServerSampling
from gateway.errors import GatewayError, invalid
from protos import gateway_pb2, worker_pb2

ROLES = ("system", "user", "assistant", "tool")


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
                    enable_custom_logit_processor: bool) -> int | None:
    """The request's own budget: native `thinking.budget`, or SGLang's custom processor with
    custom_params.thinking_budget (the smaller when both are given); None when it sets none, and then
    the server's --default-thinking-budget applies (SamplingParams.from_request). Bounds are checked
    there too; here only what SamplingParams cannot see: the processor gate and the Struct value."""
    budgets = [] if requested is None else [requested]
    if processor:
        try:  # read without unpickling; the only built-in processor is the thinking budget
            resolve_custom_processor(processor, enable_custom_logit_processor)
        except CustomProcessorError as e:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        params = struct_to_dict(custom_params) if custom_params is not None else {}
        value = params.get("thinking_budget")
        if value is not None:  # SGLang: a missing budget makes the processor a no-op
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise invalid("custom_params.thinking_budget", f"must be an integer >= 0, got {value!r}")
            if value > INT32_MAX:
                raise invalid("custom_params.thinking_budget", f"must be < 2**31, got {value!r}")
            budgets.append(value)
    return min(budgets) if budgets else None


# ---------------------------------------------------------------------------------------------
# Sampling


def check_prompt_length(prompt_len: int, context_length: int, field: str) -> None:
    if prompt_len == 0:
        raise invalid(field, "renders to an empty prompt")
    if prompt_len >= context_length:
        raise invalid(field, f"is {prompt_len} tokens; the maximum context length is "
                             f"{context_length} (prompt + at least one new token)")


def stop_strings(params: gateway_pb2.SamplingParams, prefix: str = "sampling") -> tuple[str, ...]:
    for i, s in enumerate(params.stop):
        if not s:
            raise invalid(f"{prefix}.stop[{i}]", "must not be empty")
    return tuple(dict.fromkeys(params.stop))


def worker_sampling(params: gateway_pb2.SamplingParams, server: ServerSampling, *, prompt_len: int,
                    logprobs: bool = False, top_logprobs: int = 0,
                    thinking_budget: int | None = None) -> worker_pb2.WorkerSampling:
    """Validate the request's sampling once (SamplingParams, the workers' own check) and resolve
    every default; the workers apply the result as is."""
    try:
        resolved = SamplingParams.from_request(params, server, prompt_len=prompt_len, logprobs=logprobs,
                                               top_logprobs=top_logprobs, thinking_budget=thinking_budget)
    except SamplingError as e:
        raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
    return resolved.to_wire()
