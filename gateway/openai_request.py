"""OpenAI / SGLang JSON bodies of /v1/chat/completions and /v1/completions -> the Pipeline's
request values (calls.py), one per choice.

Every top-level field is in one class (the tables below; docs/openai_http.md lists them with the
reasons): supported (converted here; the rules in checks.py and the sampling bounds in
SamplingParams are the gRPC API's own), ignored (accepted, no effect; the name goes back in the
X-Glmserve-Ignored-Fields header), refused (400 `unsupported_parameter` naming the field, unless
its value is empty or the default). Unknown fields are ignored and reported the same way, as
SGLang's pydantic models ignore them; `--strict-request-fields` refuses them instead. JSON null
means "absent" everywhere. Messages and tool schemas keep the client's key order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from common.serving.ids import new_request_id
from gateway import checks, constraints
from gateway.calls import ChatCall, Constraint, GenerateCall, PromptCache, RequestLimits, Sampling
from gateway.errors import GatewayError, invalid, unsupported

# Sampling fields that keep their name (common.serving.sampling_params.REQUEST_FIELDS minus max_tokens).
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "frequency_penalty", "presence_penalty",
            "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "logit_bias")
_BUDGET = ("custom_logit_processor", "custom_params", "thinking_token_budget")
_CONSTRAINTS = ("response_format", "json_schema", "regex", "ebnf")  # structured output (SGLang's names)
_PROMPT_CACHE = ("prompt_cache_key", "cache_salt", "extra_key")  # OpenAI's, vLLM's and SGLang's names
_COMMON = ("model", "stream", "stream_options", "stop", "n", "no_stop_trim", "rid", "max_tokens", *SAMPLING,
           *_BUDGET, *_CONSTRAINTS, *_PROMPT_CACHE)

CHAT_SUPPORTED = frozenset({
    *_COMMON, "messages", "max_completion_tokens", "tools", "tool_choice", "logprobs", "top_logprobs",
    "reasoning_effort", "chat_template_kwargs", "parallel_tool_calls", "thinking", "separate_reasoning",
    "stream_reasoning"})
COMPLETION_SUPPORTED = frozenset({*_COMMON, "prompt", "logprobs", "echo", "best_of",
                                  "skip_special_tokens"})

# accepted, no effect: field -> why
IGNORED: dict[str, str] = {
    "user": "no per-user accounting",
    "metadata": "no stored completions",
    "store": "no stored completions",
    "service_tier": "one service tier",
    "priority": "no priority scheduling yet",
    "custom_labels": "metrics carry no per-request labels",
    "return_cached_tokens_details": "usage always carries prompt_tokens_details.cached_tokens",
}
CHAT_IGNORED = {**IGNORED, "skip_special_tokens": "chat output always drops special tokens except the GLM "
                                                  "markup the parsers read"}

# refused unless empty / false / the default: field -> why
REFUSED: dict[str, str] = {
    "stop_regex": "not built yet: use stop strings",
    "structural_tag": "not accepted from clients: tool_choice required / named, or a strict tool, constrains "
                      "tool calls",
    "modalities": "GLM-4.5/4.6/4.7 are text models", "audio": "GLM-4.5/4.6/4.7 are text models",
    "prediction": "predicted outputs are not supported", "web_search_options": "no web search",
    "functions": "deprecated: use tools", "function_call": "deprecated: use tool_choice",
    "return_hidden_states": "hidden states stay on the workers",
    "return_routed_experts": "expert routing stays on the workers",
    "return_token_ids": "not built yet", "return_prompt_token_ids": "not built yet",
    "return_spec_tokens_details": "not built yet (usage of the gRPC API carries spec_accept_length)",
    "input_ids": "not built yet: send messages (chat) or token ids as the prompt of /v1/completions",
    "lora_path": "no LoRA adapters", "session_id": "no sessions", "session_params": "no sessions",
    "continue_final_message": "not built yet", "watermark": "no watermarking",
    "images_config": "text-only models", "video_config": "text-only models",
    "bootstrap_host": "glmserve owns prefill/decode routing", "bootstrap_port": "glmserve owns prefill/decode routing",
    "bootstrap_room": "glmserve owns prefill/decode routing", "routed_dp_rank": "glmserve owns routing",
    "data_parallel_rank": "glmserve owns routing", "disagg_prefill_dp_rank": "glmserve owns routing",
    "suffix": "fill-in-the-middle is not supported",
}
_TEXT_ONLY = {"modalities": (["text"],)}


@dataclass(frozen=True)
class HttpRequest:
    """One HTTP request: the calls to run (one per choice, in choice order) and how to answer."""
    calls: tuple[ChatCall | GenerateCall, ...]
    request_id: str
    model: str                       # echoed in every response (SGLang does not check it)
    stream: bool
    include_usage: bool = False
    stream_reasoning: bool = True
    no_stop_trim: bool = False
    echo: bool = False               # completions: the prompt text before the completion
    logprobs: int | None = None      # completions: top-k per token (0: the sampled token only)
    per_prompt: int = 1              # choices per prompt (n); usage counts each prompt once
    ignored: tuple[str, ...] = ()    # fields accepted without effect (reported in a header)


@dataclass(frozen=True)
class Limits:
    """What the server fixes for HTTP requests (GatewayConfig flags)."""
    max_n: int = 8
    strict_fields: bool = False
    strict_model: bool = False
    served_name: str = ""
    max_concurrent: int = 0          # --max-concurrent-requests: a request running more sequences never fits
    request: RequestLimits = field(default_factory=RequestLimits)  # the caps gRPC requests have too


def chat_request(body: Any, limits: Limits) -> HttpRequest:
    body = _object(body)
    ignored = _classify(body, CHAT_SUPPORTED, CHAT_IGNORED, limits)
    messages = _list(body, "messages", required=True)
    messages = [_reasoning_alias(m) for m in messages]
    tools = checks.check_tools(_list(body, "tools") or [], limits.request)
    mode, name = _tool_choice(body.get("tool_choice"))
    tools_shown, parse_tools = checks.select_tools(tools, mode, name)
    tool_choice = checks.tool_choice_kind(mode, name, parse_tools)
    kwargs = dict(_dict(body, "chat_template_kwargs") or {})
    if "chat_template" in kwargs:
        raise unsupported("chat_template_kwargs.chat_template", "a request may not replace the chat template")
    kwargs = _thinking(body, kwargs)
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    logprobs = _bool(body, "logprobs", False)
    sampling = _sampling(body, max_tokens, limits, logprobs=logprobs, top_logprobs=_int(body, "top_logprobs") or 0)
    constraints.check_with_tools(sampling.constraint, tool_choice)
    rid = _str(body, "rid")
    request_id = rid or new_request_id()
    n = _n(body, limits)
    _fits(n, "n", limits)
    stream, include_usage, more_ignored = _stream(body)
    base = ChatCall(messages=checks.chat_messages(messages), tools=tools_shown, parse_tools=parse_tools,
                    template_kwargs=kwargs, sampling=sampling,
                    separate_reasoning=_bool(body, "separate_reasoning", True),
                    tool_choice=tool_choice, parallel_tool_calls=_bool(body, "parallel_tool_calls", True),
                    stream=stream, model=_model(body, limits), request_id=request_id,
                    prompt_cache=_prompt_cache(body))
    calls = tuple(replace(base, request_id=_choice_id(request_id, i, n), sampling=_seeded(sampling, i))
                  for i in range(n))
    return HttpRequest(calls=calls, request_id=request_id, model=_echo_model(body, limits), stream=stream,
                       include_usage=include_usage, per_prompt=n, stream_reasoning=_bool(body, "stream_reasoning", True),
                       no_stop_trim=_bool(body, "no_stop_trim", False), ignored=ignored + more_ignored)


def completion_request(body: Any, limits: Limits) -> HttpRequest:
    body = _object(body)
    ignored = _classify(body, COMPLETION_SUPPORTED, IGNORED, limits)
    prompts = _prompts(body.get("prompt"))
    n = _n(body, limits)
    _fits(len(prompts) * n, "n" if len(prompts) == 1 else "prompt", limits)
    best_of = _int(body, "best_of")
    if best_of is not None and best_of != n:
        raise unsupported("best_of", "only best_of == n (or unset) is served")
    logprobs = _int(body, "logprobs")
    if logprobs is not None and not 0 <= logprobs <= 20:
        raise invalid("logprobs", f"must be in [0, 20], got {logprobs}")
    echo = _bool(body, "echo", False)
    if echo and logprobs is not None:
        raise unsupported("echo", "prompt logprobs are not computed; leave out logprobs with echo")
    max_tokens = body.get("max_tokens")
    sampling = _sampling(body, 16 if max_tokens is None else max_tokens, limits, logprobs=logprobs is not None,
                         top_logprobs=logprobs or 0)
    rid = _str(body, "rid")
    request_id = rid or new_request_id("cmpl-")
    stream, include_usage, more_ignored = _stream(body)
    calls = []
    for p, prompt in enumerate(prompts):
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, tuple(prompt))
        for i in range(n):
            k = p * n + i
            calls.append(GenerateCall(
                sampling=_seeded(sampling, i), text=text, token_ids=ids,
                input_field="prompt" if len(prompts) == 1 else f"prompt[{p}]",
                skip_special_tokens=_bool(body, "skip_special_tokens", True), stream=stream,
                model=_model(body, limits), request_id=_choice_id(request_id, k, len(prompts) * n),
                prompt_cache=_prompt_cache(body)))
    return HttpRequest(calls=tuple(calls), request_id=request_id, model=_echo_model(body, limits),
                       stream=stream, include_usage=include_usage, no_stop_trim=_bool(body, "no_stop_trim", False),
                       echo=echo, logprobs=logprobs, per_prompt=n, ignored=ignored + more_ignored)


# ---------------------------------------------------------------------------------------------
# fields


def _prompt_cache(body: Mapping[str, Any]) -> PromptCache:
    """prompt_cache_key routes; cache_salt (or SGLang's extra_key, the same thing) isolates."""
    salt, extra = body.get("cache_salt"), body.get("extra_key")
    if salt is not None and extra is not None and salt != extra:
        raise invalid("extra_key", "names the cache salt as cache_salt does: give one of them (or the same value)")
    return checks.prompt_cache(body.get("prompt_cache_key"), salt if salt is not None else extra,
                               "prompt_cache_key", "cache_salt" if salt is not None else "extra_key")


def _classify(body: Mapping[str, Any], supported: frozenset[str], ignored: Mapping[str, str],
              limits: Limits) -> tuple[str, ...]:
    """Refuse class-R fields that ask for something; return the names that will have no effect."""
    no_effect = []
    for name, value in body.items():
        if name in supported or value is None:
            continue
        if name in REFUSED:
            if value in (False, "", [], {}) or value in _TEXT_ONLY.get(name, ()):
                continue
            raise unsupported(name, REFUSED[name])
        if name not in ignored and limits.strict_fields:
            raise invalid(name, "is not a known field (the server runs with --strict-request-fields)")
        no_effect.append(name)
    return tuple(no_effect)


def _constraint(body: Mapping[str, Any]) -> Constraint | None:
    """response_format, json_schema, regex, ebnf: at most one (gateway/constraints.py)."""
    found = [constraints.response_format(body["response_format"]) if body.get("response_format") is not None
             else None]
    build = {"json_schema": constraints.json_schema, "regex": constraints.regex, "ebnf": constraints.ebnf}
    found += [check(body[name], name) for name, check in build.items() if body.get(name) is not None]
    return constraints.one(found)


def _reasoning_alias(m: Any) -> Any:
    """vLLM's `reasoning` is accepted for SGLang's `reasoning_content` in assistant history."""
    if isinstance(m, Mapping) and m.get("reasoning_content") is None and m.get("reasoning") is not None:
        return {**m, "reasoning_content": m["reasoning"]}
    return m


def _tool_choice(value: Any) -> tuple[str, str | None]:
    if value is None:
        return "auto", None
    if isinstance(value, str):
        if value not in checks.TOOL_CHOICE_MODES:
            raise invalid("tool_choice", f"must be one of {', '.join(checks.TOOL_CHOICE_MODES)} or a named "
                                         f"function, got {value!r}")
        return value, None
    fn = value.get("function") if isinstance(value, Mapping) else None
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(name, str) or not name:
        raise invalid("tool_choice", 'must be "auto", "none", "required" or {"type": "function", '
                                     '"function": {"name": ...}}')
    return "auto", name


def _thinking(body: Mapping[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Z.ai's `thinking` and OpenAI's reasoning_effort "none" map onto the template's enable_thinking."""
    thinking = _dict(body, "thinking")
    if thinking is not None:
        kind = thinking.get("type")
        if kind not in (None, "enabled", "disabled"):
            raise invalid("thinking.type", f'must be "enabled" or "disabled", got {kind!r}')
        if kind is not None:
            kwargs = checks.set_thinking(kwargs, kind == "enabled", "thinking.type")
        clear = thinking.get("clear_thinking")
        if clear is not None:
            if kwargs.get("clear_thinking", clear) != clear:
                raise invalid("thinking.clear_thinking", "conflicts with chat_template_kwargs.clear_thinking")
            kwargs = {**kwargs, "clear_thinking": clear}
    effort = _str(body, "reasoning_effort")
    if effort == "none":
        kwargs = checks.set_thinking(kwargs, False, "reasoning_effort")
    return kwargs


def _sampling(body: Mapping[str, Any], max_tokens: Any, limits: Limits, *, logprobs: bool,
              top_logprobs: int) -> Sampling:
    given = {name: body[name] for name in SAMPLING if body.get(name) is not None}
    if max_tokens is not None:
        given["max_tokens"] = max_tokens
    if "logit_bias" in given:
        given["logit_bias"] = _logit_bias(given["logit_bias"])
    if "stop_token_ids" in given and not isinstance(given["stop_token_ids"], list):
        raise invalid("stop_token_ids", "must be a list of token ids")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, (str, list)):
        raise invalid("stop", "must be a string or a list of strings")
    stops = checks.stop_strings([stop] if isinstance(stop, str) else (stop or []), limits.request, "stop")
    budget = _int(body, "thinking_token_budget")
    if budget is not None and budget < 0:
        raise invalid("thinking_token_budget", f"must be >= 0, got {budget}")
    return Sampling(given=given, stop=stops, logprobs=logprobs, top_logprobs=top_logprobs, thinking_budget=budget,
                    custom_logit_processor=_str(body, "custom_logit_processor"),
                    custom_params=_dict(body, "custom_params"), constraint=_constraint(body))


def _logit_bias(value: Any) -> dict[int, Any]:
    if not isinstance(value, Mapping):
        raise invalid("logit_bias", "must be an object of token id -> bias")
    out = {}
    for k, v in value.items():
        try:
            out[int(k)] = v
        except (TypeError, ValueError):
            raise invalid("logit_bias", f"keys must be token ids, got {k!r}") from None
    return out


def _stream(body: Mapping[str, Any]) -> tuple[bool, bool, tuple[str, ...]]:
    """(stream, include_usage, ignored stream_options) of a request."""
    stream = _bool(body, "stream", False)
    options = _dict(body, "stream_options") or {}
    include = options.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise invalid("stream_options.include_usage", "must be true or false")
    ignored = tuple(f"stream_options.{k}" for k, v in options.items() if k != "include_usage" and v is not None)
    return stream, bool(include), ignored


def _prompts(value: Any) -> list[str | list[int]]:
    """prompt: a string, a list of strings, a list of token ids or a list of token-id lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(x, str) for x in value):
            return list(value)
        if all(_is_int(x) for x in value):
            return [value]
        if all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in value):
            return list(value)
    raise invalid("prompt", "must be a string, a list of strings, a list of token ids or a list of such lists")


def _n(body: Mapping[str, Any], limits: Limits) -> int:
    n = _int(body, "n")
    if n is None:
        return 1
    if not 1 <= n <= limits.max_n:
        raise invalid("n", f"must be in [1, {limits.max_n}] (--max-n), got {n}")
    return n


def _fits(sequences: int, where: str, limits: Limits) -> None:
    """A request runs one sequence per prompt and choice; more than the gateway runs at once could
    never be admitted, so it is refused as too big (400), not as busy (429)."""
    if limits.max_concurrent and sequences > limits.max_concurrent:
        raise invalid(where, f"asks for {sequences} sequences (prompts x n); the gateway runs at most "
                             f"{limits.max_concurrent} at once (--max-concurrent-requests)")


def _model(body: Mapping[str, Any], limits: Limits) -> str:
    """The model the Pipeline checks: only with --strict-model-name (SGLang accepts any name)."""
    return (_str(body, "model") or "") if limits.strict_model else ""


def _echo_model(body: Mapping[str, Any], limits: Limits) -> str:
    return _str(body, "model") or limits.served_name


def _choice_id(request_id: str, i: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}-{i}"


def _seeded(s: Sampling, i: int) -> Sampling:
    """Choice i of n draws with seed + i, so choices differ and each is reproducible."""
    seed = s.given.get("seed")
    if i == 0 or not _is_int(seed):
        return s
    return replace(s, given={**s.given, "seed": seed + i})


# ---------------------------------------------------------------------------------------------
# JSON shapes


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, "the request body must be a JSON object", None,
                           "invalid_json")
    return body


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _int(body: Mapping[str, Any], name: str) -> int | None:
    v = body.get(name)
    if v is not None and not _is_int(v):
        raise invalid(name, f"must be an integer, got {v!r}")
    return v


def _bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid(name, f"must be true or false, got {v!r}")
    return v


def _str(body: Mapping[str, Any], name: str) -> str | None:
    v = body.get(name)
    if v is not None and not isinstance(v, str):
        raise invalid(name, f"must be a string, got {v!r}")
    return v


def _dict(body: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    v = body.get(name)
    if v is not None and not isinstance(v, dict):
        raise invalid(name, "must be an object")
    return v


def _list(body: Mapping[str, Any], name: str, required: bool = False) -> list[Any] | None:
    v = body.get(name)
    if v is None and required:
        raise invalid(name, "is required")
    if v is not None and not isinstance(v, list):
        raise invalid(name, "must be a list")
    return v
