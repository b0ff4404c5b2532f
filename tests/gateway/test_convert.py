"""Request conversion: presence-aware defaults and validation messages that name the field."""

from __future__ import annotations

import grpc
import pytest

from common.serving.sampling_params import SamplingParams, ServerSampling, given_fields
from gateway import checks, convert
from gateway.calls import RequestLimits, Sampling
from gateway.errors import GatewayError
from protos import gateway_pb2

DEFAULTS = SamplingParams(temperature=0.6, top_p=0.95, top_k=20)
SERVER = ServerSampling(defaults=DEFAULTS, vocab_size=1000, eos_token_ids=(7, 8), context_length=100,
                        max_tokens_limit=50)
LIMITS = RequestLimits()


def resolve(prompt_len: int = 10, server: ServerSampling = SERVER, **fields):
    return checks.worker_sampling(Sampling(given_fields(gateway_pb2.SamplingParams(**fields))), server,
                                  prompt_len=prompt_len)


def budget(requested, processor, params, enabled):
    return checks.thinking_budget(Sampling(thinking_budget=requested, custom_logit_processor=processor,
                                           custom_params=params), enabled)


def error(fn, *a, **kw) -> GatewayError:
    with pytest.raises(GatewayError) as ei:
        fn(*a, **kw)
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return ei.value


def test_temperature_zero_vs_unset() -> None:
    assert resolve().temperature == pytest.approx(0.6)       # generation_config default
    assert resolve(temperature=0.0).temperature == 0.0       # greedy, not "unset"
    assert resolve(top_k=0).top_k == 0 and resolve().top_k == 20 and resolve(top_k=-1).top_k == 0


def test_defaults_and_limits() -> None:
    ws = resolve()
    assert ws.max_tokens == 50                               # capped by --max-tokens-limit
    assert resolve(prompt_len=80).max_tokens == 20           # ... and by the context
    assert list(ws.stop_token_ids) == [7, 8] and not ws.HasField("seed") and not ws.HasField("thinking_budget")
    ws = resolve(ignore_eos=True, stop_token_ids=[9, 7], seed=0)
    assert list(ws.stop_token_ids) == [9, 7] and ws.ignore_eos and ws.HasField("seed") and ws.seed == 0
    assert list(resolve(stop_token_ids=[8, 3]).stop_token_ids) == [8, 3, 7]  # the eos ids it lacks
    assert resolve(repetition_penalty=1.1).repetition_penalty == pytest.approx(1.1)


@pytest.mark.parametrize("fields,prompt_len,message", [
    ({"top_p": 0.0}, 10, "sampling.top_p must be in (0, 1], got 0"),
    ({"top_p": 1.01}, 10, "sampling.top_p must be in (0, 1]"),
    ({"temperature": -0.1}, 10, "sampling.temperature must be >= 0"),
    ({"temperature": float("nan")}, 10, "sampling.temperature must be a finite number"),
    ({"top_k": -2}, 10, "sampling.top_k must be >= 1, or 0 / -1 for off"),
    ({"min_p": 1.5}, 10, "sampling.min_p must be in [0, 1]"),
    ({"frequency_penalty": 3}, 10, "sampling.frequency_penalty must be in [-2, 2]"),
    ({"repetition_penalty": 0}, 10, "sampling.repetition_penalty must be in (0, 2]"),
    ({"repetition_penalty": 3.0}, 10, "sampling.repetition_penalty must be in (0, 2] (1 = off), got 3"),
    ({"max_tokens": 0}, 10, "sampling.max_tokens must be >= 1, got 0"),
    ({"max_tokens": 51}, 10, "sampling.max_tokens must be <= 50"),
    ({"max_tokens": 30}, 80, "sampling.max_tokens (30) + prompt length (80) exceeds the maximum context length 100"),
    ({"max_tokens": 5, "min_tokens": 6}, 10, "sampling.min_tokens must be in [0, max_tokens=5]"),
    ({"min_tokens": -1}, 10, "sampling.min_tokens must be in [0, max_tokens=50], got -1"),
    ({"stop_token_ids": [1, 1000]}, 10, "sampling.stop_token_ids[1] must be < vocab size 1000"),
    ({"logit_bias": {5: 200.0}}, 10, "sampling.logit_bias[5] must be in [-100, 100]"),
    ({"logit_bias": {-1: 1.0}}, 10, "sampling.logit_bias keys must be token ids in [0, 1000), got -1"),
])
def test_validation_names_the_field(fields, prompt_len, message) -> None:
    assert message in error(resolve, prompt_len, **fields).message


def test_prompt_length_and_logprobs() -> None:
    assert "messages is 100 tokens; the maximum context length is 100" in \
        error(checks.check_prompt_length, 100, 100, "messages").message
    checks.check_prompt_length(99, 100, "messages")
    e = error(checks.worker_sampling, Sampling(logprobs=True, top_logprobs=21), SERVER, prompt_len=1)
    assert e.message.startswith("top_logprobs must be in [0, 20]")
    assert error(checks.worker_sampling, Sampling(top_logprobs=2), SERVER, prompt_len=1).message == \
        "top_logprobs needs logprobs: true"
    ws = checks.worker_sampling(Sampling(logprobs=True, top_logprobs=5), SERVER, prompt_len=1, thinking_budget=0)
    assert ws.logprobs and ws.top_logprobs == 5 and ws.HasField("thinking_budget") and ws.thinking_budget == 0


def _req(*messages: gateway_pb2.ChatMessage, **kw) -> gateway_pb2.ChatRequest:
    return gateway_pb2.ChatRequest(messages=list(messages), **kw)


def test_chat_messages_and_history_tool_calls() -> None:
    call = gateway_pb2.ToolCall(id="c1", function=gateway_pb2.FunctionCall(name="f", arguments='{"a": 1}'))
    req = _req(gateway_pb2.ChatMessage(role="User", content="hi"),
               gateway_pb2.ChatMessage(role="assistant", reasoning_content="", tool_calls=[call]),
               gateway_pb2.ChatMessage(role="tool", content="ok", tool_call_id="c1"))
    msgs = convert.chat_messages(req)
    assert msgs[0] == {"role": "user", "content": "hi"}
    assert msgs[1]["reasoning_content"] == "" and "reasoning_content" not in msgs[0]  # presence kept
    assert msgs[1]["tool_calls"][0]["function"] == {"name": "f", "arguments": {"a": 1}}
    assert msgs[2]["tool_call_id"] == "c1"
    bad = gateway_pb2.ToolCall(function=gateway_pb2.FunctionCall(name="f", arguments="[1]"))
    assert error(convert.chat_messages, _req(gateway_pb2.ChatMessage(role="assistant", tool_calls=[bad]))
                 ).message == "messages[0].tool_calls[0].function.arguments must be a JSON object"
    assert "messages[0].tool_calls are only allowed on assistant" in error(
        convert.chat_messages, _req(gateway_pb2.ChatMessage(role="user", tool_calls=[call]))).message


def test_tools_tool_choice_and_struct_numbers() -> None:
    t1 = gateway_pb2.Tool(function=gateway_pb2.FunctionDefinition(name="a"))
    t1.function.parameters.update({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}})
    t2 = gateway_pb2.Tool(function=gateway_pb2.FunctionDefinition(name="b", description="B"))
    msg = gateway_pb2.ChatMessage(role="user", content="x")
    tools, parse, choice = convert.chat_tools(_req(msg, tools=[t1, t2]), LIMITS)
    assert parse and choice == "auto" and [t["function"]["name"] for t in tools] == ["a", "b"]
    # Struct stores numbers as doubles; schema integers must render as 1, not 1.0
    assert tools[0]["function"]["parameters"]["properties"]["n"]["minimum"] == 1
    assert isinstance(tools[0]["function"]["parameters"]["properties"]["n"]["minimum"], int)
    assert tools[1]["function"]["parameters"] == {"type": "object", "properties": {}}
    none = gateway_pb2.ToolChoice(mode=gateway_pb2.TOOL_CHOICE_NONE)
    assert convert.chat_tools(_req(msg, tools=[t1], tool_choice=none), LIMITS) == (None, False, "none")
    named = gateway_pb2.ToolChoice(function=gateway_pb2.NamedFunction(name="b"))
    tools, parse, choice = convert.chat_tools(_req(msg, tools=[t1, t2], tool_choice=named), LIMITS)
    assert [t["function"]["name"] for t in tools] == ["b"] and parse and choice == "named"
    required = gateway_pb2.ToolChoice(mode=gateway_pb2.TOOL_CHOICE_REQUIRED)
    assert convert.chat_tools(_req(msg, tools=[t1], tool_choice=required), LIMITS)[2] == "required"
    assert convert.chat_tools(_req(msg), LIMITS) == (None, False, "auto")
    assert "tools[1].function.name 'a' is declared twice" in error(convert.chat_tools, _req(msg, tools=[t1, t1]), LIMITS).message


def test_thinking_budget_is_the_requests_own() -> None:
    params = {"thinking_budget": 300}
    assert budget(None, None, None, True) is None          # none set: the default applies later
    assert budget(50, None, None, True) == 50
    assert budget(None, "glm4_moe_thinking_budget", params, True) == 300
    assert budget(500, "glm4_moe_thinking_budget", params, True) == 300  # both: the smaller
    e = error(budget, None, '{"callable": "80"}', None, True)
    assert "custom_logit_processor" in e.message
    assert "--enable-custom-logit-processor" in error(budget, None, "glm4_moe_thinking_budget", params, False).message
    assert "custom_params.thinking_budget must be an integer >= 0" in error(
        budget, None, "glm4_moe_thinking_budget", {"thinking_budget": -1}, True).message
    assert "custom_params.thinking_budget must be < 2**31" in error(
        budget, None, "glm4_moe_thinking_budget", {"thinking_budget": 2**31}, True).message


def test_default_thinking_budget_applies_only_when_the_request_sets_none() -> None:
    server = ServerSampling(defaults=SamplingParams(thinking_budget=100), vocab_size=1000, eos_token_ids=(7,),
                            context_length=100)
    empty = Sampling()
    assert checks.worker_sampling(empty, server, prompt_len=1).thinking_budget == 100
    assert checks.worker_sampling(empty, server, prompt_len=1, thinking_budget=300).thinking_budget == 300
    assert checks.worker_sampling(empty, server, prompt_len=1, thinking_budget=0).thinking_budget == 0
    assert not checks.worker_sampling(empty, SERVER, prompt_len=1).HasField("thinking_budget")
    assert error(checks.worker_sampling, empty, server, prompt_len=1, thinking_budget=-1).message == \
        "thinking.budget must be in [0, 2**31), got -1"


def test_prompt_cache_routing_key_and_salt() -> None:
    from gateway.calls import PromptCache

    pc = gateway_pb2.PromptCache(routing_key="conv-1", cache_salt="tenant")
    assert convert.chat_call(_req(gateway_pb2.ChatMessage(role="user", content="hi"), prompt_cache=pc),
                             LIMITS).prompt_cache == PromptCache("conv-1", "tenant")
    gen = gateway_pb2.GenerateRequest(text="x", prompt_cache=gateway_pb2.PromptCache(cache_salt="t"))
    assert convert.generate_call(gen, LIMITS).prompt_cache == PromptCache(None, "t")
    assert convert.generate_call(gateway_pb2.GenerateRequest(text="x"), LIMITS).prompt_cache == PromptCache()
    long = gateway_pb2.GenerateRequest(text="x", prompt_cache=gateway_pb2.PromptCache(routing_key="k" * 300))
    assert error(convert.generate_call, long, LIMITS).message == \
        "prompt_cache.routing_key must be at most 256 characters, got 300"
