"""Request rules both public surfaces share (the gRPC converter and the OpenAI HTTP adapter), so a
request means the same and is refused with the same message whichever way it came in.

Every refusal is `invalid(field, problem)` naming the field by its path in the request
("messages[1].tool_calls[0].function.arguments must be a JSON object"). Sampling bounds are not
here: SamplingParams.from_request owns them (common/serving/sampling_params.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from common.serving.custom_processor import CustomProcessorError, resolve_custom_processor
from common.serving.sampling_params import INT32_MAX, Grammar, SamplingError, SamplingParams, ServerSampling
from gateway.calls import PromptCache, RequestLimits, Sampling
from gateway.errors import GatewayError, invalid
from protos import worker_pb2

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role
TOOL_CHOICE_MODES = ("auto", "none", "required")
PROMPT_CHARS_PER_TOKEN = 16  # default --max-prompt-chars = this x the context length: far above real text


# ---------------------------------------------------------------------------------------------
# Messages and tools


def chat_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Roles checked and normalised; assistant history's tool-call arguments parsed to objects.
    Content (string, null or text parts) is checked by the chat template's normaliser."""
    if not messages:
        raise invalid("messages", "must not be empty")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise invalid(where, "must be an object with a role")
        given = m.get("role")
        role = given.strip().lower() if isinstance(given, str) else given
        role = ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise invalid(f"{where}.role", f"must be one of {', '.join(ROLES)} (or developer), got {given!r}")
        msg: dict[str, Any] = {"role": role, "content": m.get("content")}
        if m.get("reasoning_content") is not None:
            if role != "assistant":
                raise invalid(f"{where}.reasoning_content", "is only allowed on assistant messages")
            if not isinstance(m["reasoning_content"], str):
                raise invalid(f"{where}.reasoning_content", "must be a string")
            msg["reasoning_content"] = m["reasoning_content"]
        if m.get("tool_calls"):
            if role != "assistant":
                raise invalid(f"{where}.tool_calls", "are only allowed on assistant messages")
            if not isinstance(m["tool_calls"], Sequence) or isinstance(m["tool_calls"], (str, bytes)):
                raise invalid(f"{where}.tool_calls", "must be a list")
            msg["tool_calls"] = [history_tool_call(tc, f"{where}.tool_calls[{j}]")
                                 for j, tc in enumerate(m["tool_calls"])]
        if role == "tool":
            msg["tool_call_id"] = m.get("tool_call_id") or ""
        if m.get("name"):
            msg["name"] = m["name"]
        out.append(msg)
    return out


def history_tool_call(tc: Any, where: str) -> dict[str, Any]:
    """One assistant tool call of the history: arguments given as a JSON string or an object."""
    if not isinstance(tc, Mapping) or not isinstance(tc.get("function"), Mapping):
        raise invalid(f"{where}.function", "must be an object with name and arguments")
    if tc.get("type") not in (None, "", "function"):
        raise invalid(f"{where}.type", f"must be \"function\", got {tc.get('type')!r}")
    fn = tc["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise invalid(f"{where}.function.name", "must not be empty")
    args = fn.get("arguments")
    if isinstance(args, str) or args is None:
        try:
            args = json.loads(args or "{}")
        except json.JSONDecodeError as e:
            raise invalid(f"{where}.function.arguments", f"must be valid JSON: {e}") from None
    if not isinstance(args, dict):
        raise invalid(f"{where}.function.arguments", "must be a JSON object")
    return {"id": tc.get("id") or "", "type": "function", "function": {"name": name, "arguments": args}}


def check_parameters_schema(schema: Any, field: str) -> None:
    """A function's `parameters` must be a JSON schema of an object: {"type": "object"} (type may be
    left out), `properties` an object of schemas, `required` a list of property names. The model
    is shown the schema and the tool parser reads arguments against it, so a malformed one fails
    here, naming the tool, rather than later or never."""
    if not isinstance(schema, Mapping):
        raise invalid(field, "must be a JSON schema object")
    if schema.get("type", "object") != "object":
        raise invalid(f"{field}.type", f"must be \"object\" (a function takes named arguments), "
                                       f"got {schema.get('type')!r}")
    props = schema.get("properties", {})
    if not isinstance(props, Mapping) or not all(isinstance(v, (Mapping, bool)) for v in props.values()):
        raise invalid(f"{field}.properties", "must be an object mapping each argument name to a JSON schema")
    required = schema.get("required", [])
    if not isinstance(required, (list, tuple)) or not all(isinstance(r, str) for r in required):
        raise invalid(f"{field}.required", "must be a list of argument names")


def check_tools(tools: Sequence[Any], limits: RequestLimits) -> list[dict[str, Any]]:
    """OpenAI tool objects, in the client's key order; `parameters` defaults to an empty object schema.
    The count is checked before any tool is looked at, the total size after each is known to be JSON."""
    if len(tools) > limits.max_tools:
        raise invalid("tools", f"has {len(tools)} tools; at most {limits.max_tools} are accepted (--max-tools)")
    out = []
    names: set[str] = set()
    for i, t in enumerate(tools):
        if not isinstance(t, Mapping) or not isinstance(t.get("function"), Mapping):
            raise invalid(f"tools[{i}].function", "must be an object with a name")
        if t.get("type") not in (None, "", "function"):
            raise invalid(f"tools[{i}].type", f"must be \"function\", got {t.get('type')!r}")
        fn = dict(t["function"])
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise invalid(f"tools[{i}].function.name", "must not be empty")
        if name in names:
            raise invalid(f"tools[{i}].function.name", f"{name!r} is declared twice")
        names.add(name)
        if fn.get("parameters") is None:
            fn["parameters"] = {"type": "object", "properties": {}}
        else:
            check_parameters_schema(fn["parameters"], f"tools[{i}].function.parameters")
        out.append({**t, "type": "function", "function": fn})
    if out:
        try:
            size = len(json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass"))
        except (TypeError, ValueError) as e:  # only from a hand-built dict; JSON and Struct always dump
            raise invalid("tools", f"must be JSON: {e}") from None
        if size > limits.max_tools_bytes:
            raise invalid("tools", f"are {size} bytes as JSON; at most {limits.max_tools_bytes} are accepted "
                                   f"(--max-tools-bytes)")
    return out


def select_tools(tools: list[dict[str, Any]], mode: str, name: str | None
                 ) -> tuple[list[dict[str, Any]] | None, bool]:
    """(tools shown to the model, whether to parse tool calls) after tool_choice.
    `mode` auto / none / required; `name` set for a named tool. `required` and a named tool are
    enforced while decoding (ForcedPrefix: the Pipeline's `_forced_prefix`)."""
    if name is not None:
        if not tools:
            raise invalid("tool_choice", "names a function but no tools were given")
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise invalid("tool_choice.function.name", f"{name!r} is not in tools")
        return chosen, True
    if mode == "none":
        return None, False
    if mode == "required" and not tools:
        raise invalid("tool_choice", "is required but no tools were given")
    return (tools or None), bool(tools)


def tool_choice_kind(mode: str, name: str | None, parse_tools: bool) -> str:
    """ChatCall.tool_choice: "named" for a named tool, the mode otherwise; "auto" without tools."""
    if not parse_tools:
        return "none" if mode == "none" else "auto"
    return "named" if name is not None else mode


def set_thinking(kwargs: dict[str, Any], enabled: bool, field: str) -> dict[str, Any]:
    """`kwargs` with enable_thinking = `enabled`; a different value already there is a conflict."""
    given = kwargs.get("enable_thinking")
    if given is not None and bool(given) != enabled:
        raise invalid(field, "conflicts with chat_template_kwargs.enable_thinking")
    return {**kwargs, "enable_thinking": enabled}


# ---------------------------------------------------------------------------------------------
# Thinking budget and sampling


def thinking_budget(s: Sampling, enable_custom_logit_processor: bool) -> int | None:
    """The request's own budget: the native one, or SGLang's custom processor with
    custom_params.thinking_budget (the smaller when both are given); None when it sets none, and then
    the server's --default-thinking-budget applies (SamplingParams.from_request). Bounds are checked
    there too; here only what SamplingParams cannot see: the processor gate and custom_params."""
    budgets = [] if s.thinking_budget is None else [s.thinking_budget]
    if s.custom_logit_processor:
        try:  # read without unpickling; the only built-in processor is the thinking budget
            resolve_custom_processor(s.custom_logit_processor, enable_custom_logit_processor)
        except CustomProcessorError as e:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, str(e), "custom_logit_processor") from None
        value = (s.custom_params or {}).get("thinking_budget")
        if value is not None:  # SGLang: a missing budget makes the processor a no-op
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise invalid("custom_params.thinking_budget", f"must be an integer >= 0, got {value!r}")
            if value > INT32_MAX:
                raise invalid("custom_params.thinking_budget", f"must be < 2**31, got {value!r}")
            budgets.append(value)
    return min(budgets) if budgets else None


MAX_PROMPT_CACHE_CHARS = 256


def prompt_cache(routing_key: Any, salt: Any, routing_field: str, salt_field: str) -> PromptCache:
    """A request's routing key and cache salt (each None when absent): strings of at most
    MAX_PROMPT_CACHE_CHARS characters; an empty key counts as none."""
    for value, field in ((routing_key, routing_field), (salt, salt_field)):
        if value is None:
            continue
        if not isinstance(value, str):
            raise invalid(field, f"must be a string, got {type(value).__name__}")
        if len(value) > MAX_PROMPT_CACHE_CHARS:
            raise invalid(field, f"must be at most {MAX_PROMPT_CACHE_CHARS} characters, got {len(value)}")
    return PromptCache(routing_key or None, salt or "")


def check_prompt_chars(chars: int, limit: int, field: str) -> None:
    """The prompt's size before tokenising: the tokenizer's time and memory grow with the text, and
    a text far longer than the context can only be refused after paying for it."""
    if chars > limit:
        raise invalid(field, f"is {chars} characters; at most {limit} are accepted before tokenising "
                             f"(--max-prompt-chars)")


def check_prompt_length(prompt_len: int, context_length: int, field: str) -> None:
    if prompt_len == 0:
        raise invalid(field, "renders to an empty prompt")
    if prompt_len >= context_length:
        raise invalid(field, f"is {prompt_len} tokens; the maximum context length is "
                             f"{context_length} (prompt + at least one new token)")


def stop_strings(stops: Sequence[Any], limits: RequestLimits, field: str = "sampling.stop") -> tuple[str, ...]:
    """Every stop string is matched against the text after each token, so their number and length
    bound the per-token work of the whole request."""
    if len(stops) > limits.max_stop_strings:
        raise invalid(field, f"has {len(stops)} strings; at most {limits.max_stop_strings} are accepted "
                             f"(--max-stop-strings)")
    for i, s in enumerate(stops):
        if not isinstance(s, str) or not s:
            raise invalid(f"{field}[{i}]", "must not be empty" if s == "" else "must be a string")
        if len(s) > limits.max_stop_string_chars:
            raise invalid(f"{field}[{i}]", f"is {len(s)} characters; at most {limits.max_stop_string_chars} are "
                                           f"accepted (--max-stop-string-chars)")
    return tuple(dict.fromkeys(stops))


def worker_sampling(s: Sampling, server: ServerSampling, *, prompt_len: int, thinking_budget: int | None = None,
                    forced_prefix: tuple[int, ...] = (), reasoning_first: bool = False,
                    grammar: Grammar | None = None) -> worker_pb2.WorkerSampling:
    """Validate the request's sampling once (SamplingParams, the workers' own check) and resolve
    every default; the workers apply the result as is."""
    try:
        resolved = SamplingParams.from_request(s.given, server, prompt_len=prompt_len, logprobs=s.logprobs,
                                               top_logprobs=s.top_logprobs, thinking_budget=thinking_budget,
                                               forced_prefix=forced_prefix, reasoning_first=reasoning_first,
                                               grammar=grammar)
    except SamplingError as e:
        raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, str(e), e.field) from None
    return resolved.to_wire()
