"""The request values the Pipeline serves, built by both public surfaces: the gRPC converter
(convert.py, from gateway.proto messages) and the OpenAI HTTP adapter (openai_request.py, from JSON).

They hold what the client asked for, checked for shape but not yet resolved: sampling fields stay
"as given" (absent = not in `Sampling.given`) so that `SamplingParams.from_request` alone applies
defaults and bounds, whichever surface the request came through. Messages and tools are plain dicts
in the client's key order (the chat template renders tool schemas with `tojson` in that order).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.serving.sampling_params import Grammar


@dataclass(frozen=True)
class RequestLimits:
    """Per-request caps both surfaces apply through checks.py, so a request too big for the process is
    refused (INVALID_ARGUMENT / HTTP 400, naming the field and the flag) before it costs much. Values
    are GatewayConfig flags (docs/client_usage.md §Limits)."""
    max_stop_strings: int = 64               # stop strings of one request
    max_stop_string_chars: int = 1024        # characters of one stop string
    max_tools: int = 256                     # tool definitions of one request
    max_tools_bytes: int = 1024 * 1024       # all tool definitions as compact UTF-8 JSON
    max_prompt_chars: int | None = None      # prompt characters before tokenising (None: 16 x the context length)


@dataclass(frozen=True)
class Constraint:
    """A structured-output constraint and the public field it came from, for error messages
    ("response_format.json_schema.schema", "sampling.regex"); None for the gateway's own tool-call
    grammar (gateway/tool_grammar.py)."""
    grammar: Grammar
    field: str | None


@dataclass(frozen=True)
class Sampling:
    """A request's sampling as given: `given` has only the fields the client set (names of
    common.serving.sampling_params.REQUEST_FIELDS), the rest is what SamplingParams needs besides."""
    given: Mapping[str, Any] = field(default_factory=dict)
    stop: tuple[str, ...] = ()                  # stop strings, checked non-empty and de-duplicated
    logprobs: bool = False
    top_logprobs: int = 0
    thinking_budget: int | None = None          # the native budget (gRPC thinking.budget, HTTP thinking_token_budget)
    custom_logit_processor: str | None = None   # SGLang's field; the budget then comes from custom_params
    custom_params: Mapping[str, Any] | None = None
    constraint: Constraint | None = None        # structured output (gateway/constraints.py)


@dataclass(frozen=True)
class PromptCache:
    """How a request meets the prefix cache: `routing_key` keeps requests that share it on the same
    workers until the cache index knows where their prompt is; `salt` isolates its cached pages
    (only requests with the same salt share them; "" = the common pool)."""
    routing_key: str | None = None
    salt: str = ""


@dataclass(frozen=True)
class ChatCall:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None  # shown to the model (None: no tools in the prompt)
    parse_tools: bool                   # run the tool-call parser on the output
    template_kwargs: dict[str, Any]
    sampling: Sampling
    separate_reasoning: bool = True
    tool_choice: str = "auto"           # auto | none | required | named (the one tool in `tools`)
    parallel_tool_calls: bool = True    # False: tool_choice "required" allows exactly one call
    stream: bool = True                 # False: the Pipeline yields one message with the whole answer
    model: str = ""                     # "" = the served model, else checked against its name
    request_id: str | None = None       # None: the Pipeline draws "chatcmpl-<hex>"
    prompt_cache: PromptCache = PromptCache()


@dataclass(frozen=True)
class GenerateCall:
    sampling: Sampling
    text: str | None = None             # exactly one of text / token_ids
    token_ids: tuple[int, ...] | None = None
    input_field: str = "text"           # the public name of the input, for error messages
    skip_special_tokens: bool = True
    stream: bool = True
    model: str = ""
    request_id: str | None = None       # None: "cmpl-<hex>"
    prompt_cache: PromptCache = PromptCache()
