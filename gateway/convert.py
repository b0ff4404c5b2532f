"""gRPC request protos (gateway.proto) -> the Pipeline's request values (calls.py).

Only the proto side lives here: presence (`HasField`), Struct -> dict, enums. The rules a request
must follow are in checks.py, shared with the OpenAI HTTP adapter; sampling is resolved and
validated by SamplingParams (common/serving/sampling_params.py), the same code the workers check
the wire with: an absent field takes the model default, a present value is taken literally
(temperature 0 = greedy).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2

from common.serving.sampling_params import given_fields
from gateway import checks, constraints
from gateway.calls import ChatCall, Constraint, GenerateCall, PromptCache, RequestLimits, Sampling
from gateway.errors import invalid
from protos import gateway_pb2

_MODES = {gateway_pb2.TOOL_CHOICE_MODE_UNSPECIFIED: "auto", gateway_pb2.TOOL_CHOICE_AUTO: "auto",
          gateway_pb2.TOOL_CHOICE_NONE: "none", gateway_pb2.TOOL_CHOICE_REQUIRED: "required"}


def struct_to_dict(s: struct_pb2.Struct) -> dict[str, Any]:
    """Struct -> dict, with integral numbers back to int (Struct stores every number as a double,
    and a JSON schema's `"minimum": 1` must not render as `1.0` in the prompt) and keys sorted at
    every level: a Struct keeps no key order (a serialize/parse round trip, or another language's
    map, reorders it), so sorted is the one order that renders the same prompt -- and the same
    cacheable prefix -- every time (docs/openai_http.md, "Prefix caching")."""
    return _plain(json_format.MessageToDict(s))


def _plain(v: Any) -> Any:
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return int(v)
    if isinstance(v, dict):
        return {k: _plain(v[k]) for k in sorted(v)}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def _opt(msg: Any, name: str) -> Any:
    return getattr(msg, name) if msg.HasField(name) else None


def chat_messages(req: gateway_pb2.ChatRequest) -> list[dict[str, Any]]:
    msgs = []
    for m in req.messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content, "tool_call_id": m.tool_call_id, "name": m.name,
                             "tool_calls": [{"id": tc.id, "type": tc.type, "function": {
                                 "name": tc.function.name, "arguments": tc.function.arguments}}
                                 for tc in m.tool_calls]}
        if m.HasField("reasoning_content"):
            d["reasoning_content"] = m.reasoning_content
        msgs.append(d)
    return checks.chat_messages(msgs)


def chat_tools(req: gateway_pb2.ChatRequest, limits: RequestLimits) -> tuple[list[dict[str, Any]] | None, bool, str]:
    """(tools for the template, whether to parse tool calls, ChatCall.tool_choice) after tool_choice."""
    tools = []
    for t in req.tools:
        fn: dict[str, Any] = {"name": t.function.name}
        if t.function.description:
            fn["description"] = t.function.description
        if t.function.HasField("parameters"):
            fn["parameters"] = struct_to_dict(t.function.parameters)
        if t.function.HasField("strict"):
            fn["strict"] = t.function.strict
        tools.append({"type": t.type or "function", "function": fn})
    tools = checks.check_tools(tools, limits)
    choice = req.tool_choice
    which = choice.WhichOneof("choice") if req.HasField("tool_choice") else None
    mode = _MODES.get(choice.mode, "auto") if which == "mode" else "auto"
    name = choice.function.name if which == "function" else None
    shown, parse = checks.select_tools(tools, mode, name)
    return shown, parse, checks.tool_choice_kind(mode, name, parse)


def template_kwargs(req: gateway_pb2.ChatRequest) -> dict[str, Any]:
    kwargs = struct_to_dict(req.chat_template_kwargs) if req.HasField("chat_template_kwargs") else {}
    if req.HasField("thinking") and req.thinking.HasField("enabled"):
        kwargs = checks.set_thinking(kwargs, req.thinking.enabled, "thinking.enabled")
    return kwargs


def sampling(params: gateway_pb2.SamplingParams, req: Any, thinking_budget: int | None,
             limits: RequestLimits, response_format: Constraint | None = None) -> Sampling:
    """The Sampling of a ChatRequest or GenerateRequest (both carry the same optional fields)."""
    return Sampling(
        given=given_fields(params), stop=checks.stop_strings(params.stop, limits),
        logprobs=bool(_opt(req, "logprobs")), top_logprobs=_opt(req, "top_logprobs") or 0,
        thinking_budget=thinking_budget, custom_logit_processor=_opt(req, "custom_logit_processor"),
        custom_params=struct_to_dict(req.custom_params) if req.HasField("custom_params") else None,
        constraint=constraints.one([response_format, *sampling_constraints(params)]))


def sampling_constraints(params: gateway_pb2.SamplingParams) -> list[Constraint]:
    """SGLang's sampling_params json_schema / regex / ebnf, in that order."""
    build = {"json_schema": constraints.json_schema, "regex": constraints.regex, "ebnf": constraints.ebnf}
    return [check(getattr(params, name), f"sampling.{name}") for name, check in build.items()
            if params.HasField(name)]


def response_format(req: gateway_pb2.ChatRequest) -> Constraint | None:
    if not req.HasField("response_format"):
        return None
    rf = req.response_format
    value: dict[str, Any] = {"type": rf.type}
    if rf.HasField("json_schema"):
        js = rf.json_schema
        spec: dict[str, Any] = {"name": js.name}
        if js.HasField("schema"):
            spec["schema"] = struct_to_dict(js.schema)
        if js.HasField("strict"):
            spec["strict"] = js.strict
        value["json_schema"] = spec
    return constraints.response_format(value)


def chat_call(req: gateway_pb2.ChatRequest, limits: RequestLimits) -> ChatCall:
    tools, parse_tools, tool_choice = chat_tools(req, limits)
    budget = req.thinking.budget if req.HasField("thinking") and req.thinking.HasField("budget") else None
    chat_sampling = sampling(req.sampling, req, budget, limits, response_format(req))
    constraints.check_with_tools(chat_sampling.constraint, tool_choice)
    return ChatCall(
        messages=chat_messages(req), tools=tools, parse_tools=parse_tools, template_kwargs=template_kwargs(req),
        sampling=chat_sampling,
        separate_reasoning=req.separate_reasoning if req.HasField("separate_reasoning") else True,
        tool_choice=tool_choice, stream=req.stream if req.HasField("stream") else True,
        parallel_tool_calls=req.parallel_tool_calls if req.HasField("parallel_tool_calls") else True,
        model=req.model, request_id=_opt(req, "request_id") or None, prompt_cache=prompt_cache(req))


def prompt_cache(req: gateway_pb2.ChatRequest | gateway_pb2.GenerateRequest) -> PromptCache:
    pc = req.prompt_cache
    return checks.prompt_cache(_opt(pc, "routing_key"), _opt(pc, "cache_salt"),
                               "prompt_cache.routing_key", "prompt_cache.cache_salt")


def generate_call(req: gateway_pb2.GenerateRequest, limits: RequestLimits) -> GenerateCall:
    which = req.WhichOneof("input")
    if which is None:
        raise invalid("input", "must be set: text or tokens")
    return GenerateCall(
        sampling=sampling(req.sampling, req, None, limits),
        text=req.text if which == "text" else None,
        token_ids=tuple(req.tokens.ids) if which == "tokens" else None,
        input_field="text" if which == "text" else "tokens.ids",
        skip_special_tokens=req.skip_special_tokens if req.HasField("skip_special_tokens") else True,
        stream=req.stream if req.HasField("stream") else True,
        model=req.model, request_id=_opt(req, "request_id") or None, prompt_cache=prompt_cache(req))
