"""OpenAI JSON -> the Pipeline's request values: every field class, defaults, refusals naming the
field, and the response shapes built from the Pipeline's messages (no servers)."""

from __future__ import annotations

import grpc
import pytest

from common.serving.sampling_params import SamplingParams, ServerSampling
from gateway import checks
from gateway.errors import GatewayError
from gateway.openai_errors import error_body, from_gateway_error
from gateway.openai_request import (
    CHAT_IGNORED,
    CHAT_SUPPORTED,
    COMPLETION_SUPPORTED,
    REFUSED,
    Limits,
    chat_request,
    completion_request,
)
from gateway.openai_response import ChatFormatter, CompletionFormatter
from protos import gateway_pb2

USER = [{"role": "user", "content": "hi"}]
LIMITS = Limits(served_name="glm")
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "zeta": {"type": "string"}, "alpha": {"type": "object", "properties": {"y": {}, "b": {}}}}}}}


def chat(**body):
    return chat_request({"model": "m", "messages": USER, **body}, LIMITS)


def refused(fn, body, limits=LIMITS) -> GatewayError:
    with pytest.raises(GatewayError) as ei:
        fn(body, limits)
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return ei.value


def test_defaults_and_supported_fields():
    r = chat()
    (call,) = r.calls
    assert (r.model, r.stream, r.include_usage, r.stream_reasoning, r.ignored) == ("m", False, False, True, ())
    assert call.sampling.given == {} and call.sampling.stop == () and call.sampling.thinking_budget is None
    assert call.tools is None and not call.parse_tools and call.separate_reasoning and not call.stream
    assert call.model == "" and call.request_id == r.request_id and r.request_id.startswith("chatcmpl-")
    r = chat(temperature=0, top_p=0.5, top_k=5, min_p=0.1, seed=3, frequency_penalty=1, presence_penalty=-1,
             repetition_penalty=1.1, min_tokens=2, ignore_eos=True, stop_token_ids=[5], logit_bias={"7": 10},
             max_tokens=9, max_completion_tokens=8, stop="END", stream=True, stream_options={"include_usage": True},
             rid="req-1", separate_reasoning=False, stream_reasoning=False, no_stop_trim=True,
             thinking_token_budget=100, logprobs=True, top_logprobs=3)
    s = r.calls[0].sampling
    assert s.given == {"temperature": 0, "top_p": 0.5, "top_k": 5, "min_p": 0.1, "seed": 3, "frequency_penalty": 1,
                       "presence_penalty": -1, "repetition_penalty": 1.1, "min_tokens": 2, "ignore_eos": True,
                       "stop_token_ids": [5], "logit_bias": {7: 10}, "max_tokens": 8}  # max_completion_tokens wins
    assert s.stop == ("END",) and s.thinking_budget == 100 and s.logprobs and s.top_logprobs == 3
    assert r.stream and r.calls[0].stream and r.include_usage and not r.stream_reasoning and r.no_stop_trim
    assert r.request_id == r.calls[0].request_id == "req-1" and not r.calls[0].separate_reasoning
    # the resolved sampling is SamplingParams' own (temperature 0 = greedy, not "unset")
    server = ServerSampling(defaults=SamplingParams(temperature=0.6), vocab_size=100, eos_token_ids=(9,),
                            context_length=50)
    wire = checks.worker_sampling(s, server, prompt_len=4)
    assert wire.temperature == 0 and wire.max_tokens == 8 and list(wire.stop_token_ids) == [5]  # ignore_eos


def test_every_field_has_a_class_and_refusals_name_the_field():
    assert not set(CHAT_SUPPORTED) & set(CHAT_IGNORED) and not set(CHAT_SUPPORTED) & set(REFUSED)
    r = chat(user="u", metadata={"a": "b"}, store=False, parallel_tool_calls=False, frobnicate=1,
             stream_options={"continuous_usage_stats": True})
    assert r.ignored == ("user", "metadata", "store", "frobnicate",
                         "stream_options.continuous_usage_stats")
    for name in REFUSED:
        if name == "suffix":
            continue
        e = refused(chat_request, {"messages": USER, name: "x"})
        assert (e.field, e.reason) == (name, "unsupported_parameter") and e.message.startswith(f"{name} is not")
    # empty or default values of refused fields are harmless
    chat(modalities=["text"], return_hidden_states=False, regex=None, functions=[], response_format={"type": "text"})
    assert chat(response_format={"type": "json_object"}).calls[0].sampling.constraint.grammar.kind == "json_object"
    strict = Limits(strict_fields=True)
    assert refused(chat_request, {"messages": USER, "frobnicate": 1}, strict).field == "frobnicate"
    assert chat_request({"messages": USER, "user": "u"}, strict).ignored == ("user",)  # class I stays accepted


def test_the_field_tables_are_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "openai_http.md").read_text()
    names = set(CHAT_SUPPORTED) | set(COMPLETION_SUPPORTED) | set(CHAT_IGNORED) | set(REFUSED)
    assert sorted(n for n in names if f"`{n}`" not in doc) == []


@pytest.mark.parametrize("body,field", [
    ({}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{}]}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}] * 2}, "tools[1].function.name"),
    ({"messages": USER, "tool_choice": "required"}, "tool_choice"),
    ({"messages": USER, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
     "tool_choice.function.name"),
    ({"messages": USER, "tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": USER, "stop": ["a", ""]}, "stop[1]"),
    ({"messages": USER, "logit_bias": {"x": 1}}, "logit_bias"),
    ({"messages": USER, "n": 9}, "n"),
    ({"messages": USER, "stream": "yes"}, "stream"),
    ({"messages": USER, "thinking_token_budget": -1}, "thinking_token_budget"),
    ({"messages": USER, "chat_template_kwargs": {"chat_template": "x"}}, "chat_template_kwargs.chat_template"),
    ({"messages": USER, "chat_template_kwargs": {"enable_thinking": True}, "thinking": {"type": "disabled"}},
     "thinking.type"),
    ({"messages": USER, "chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": "none"},
     "reasoning_effort"),
    ({"messages": USER, "prompt_cache_key": 7}, "prompt_cache_key"),
    ({"messages": USER, "cache_salt": "s" * 257}, "cache_salt"),
    ({"messages": USER, "extra_key": ["x"]}, "extra_key"),
    ({"messages": USER, "cache_salt": "a", "extra_key": "b"}, "extra_key"),
])
def test_bad_chat_fields_are_named(body, field):
    assert refused(chat_request, body).field == field


def test_prompt_cache_fields():
    from gateway.calls import PromptCache

    assert chat().calls[0].prompt_cache == PromptCache()
    r = chat(prompt_cache_key="conv-7", cache_salt="tenant-a", n=2)
    assert [c.prompt_cache for c in r.calls] == [PromptCache("conv-7", "tenant-a")] * 2 and r.ignored == ()
    assert chat(extra_key="t", cache_salt="t", prompt_cache_key="").calls[0].prompt_cache == PromptCache(None, "t")
    (call,) = completion_request({"model": "m", "prompt": "x", "extra_key": "t"}, LIMITS).calls
    assert call.prompt_cache == PromptCache(None, "t")


def test_tools_thinking_and_roles():
    r = chat(tools=[TOOL, {"type": "function", "function": {"name": "g"}}],
             tool_choice={"type": "function", "function": {"name": "f"}},
             messages=[{"role": "developer", "content": "be brief"},
                       {"role": "assistant", "content": None, "reasoning": "thought",
                        "tool_calls": [{"id": "c", "type": "function",
                                        "function": {"name": "f", "arguments": '{"zeta": "z"}'}}]},
                       {"role": "tool", "tool_call_id": "c", "content": "ok"}, *USER],
             thinking={"type": "disabled", "clear_thinking": False})
    call = r.calls[0]
    assert [t["function"]["name"] for t in call.tools] == ["f"] and call.parse_tools
    # the client's key order reaches the template (tojson renders it as given)
    assert list(call.tools[0]["function"]["parameters"]["properties"]) == ["zeta", "alpha"]
    assert list(call.tools[0]["function"]["parameters"]["properties"]["alpha"]["properties"]) == ["y", "b"]
    assert [m["role"] for m in call.messages] == ["system", "assistant", "tool", "user"]
    assert call.messages[1]["reasoning_content"] == "thought"
    assert call.messages[1]["tool_calls"][0]["function"]["arguments"] == {"zeta": "z"}
    assert call.template_kwargs == {"enable_thinking": False, "clear_thinking": False}
    assert chat(reasoning_effort="none").calls[0].template_kwargs == {"enable_thinking": False}
    assert chat(reasoning_effort="high").calls[0].template_kwargs == {}
    none = chat(tools=[TOOL], tool_choice="none").calls[0]
    assert none.tools is None and not none.parse_tools
    auto = chat(tools=[TOOL]).calls[0]
    assert auto.tools is not None and auto.parse_tools


def test_n_seeds_and_strict_model():
    r = chat(n=3, seed=10, rid="x")
    assert [c.request_id for c in r.calls] == ["x-0", "x-1", "x-2"] and r.request_id == "x"
    assert [c.sampling.given["seed"] for c in r.calls] == [10, 11, 12]
    assert [c.sampling.given.get("seed") for c in chat(n=2).calls] == [None, None]
    assert chat_request({"model": "other", "messages": USER}, Limits(strict_model=True)).calls[0].model == "other"
    assert chat_request({"messages": USER}, LIMITS).model == "glm"  # absent model: the served name is echoed


def test_completion_prompts_and_fields():
    r = completion_request({"prompt": "hi"}, LIMITS)
    assert r.calls[0].text == "hi" and r.calls[0].sampling.given == {"max_tokens": 16}  # OpenAI's default
    r = completion_request({"prompt": [[1, 2], [3]], "n": 2, "echo": True, "seed": 1}, LIMITS)
    assert [c.token_ids for c in r.calls] == [(1, 2), (1, 2), (3,), (3,)] and r.per_prompt == 2 and r.echo
    assert [c.input_field for c in r.calls] == ["prompt[0]", "prompt[0]", "prompt[1]", "prompt[1]"]
    assert completion_request({"prompt": [5, 6], "logprobs": 2}, LIMITS).calls[0].sampling.top_logprobs == 2
    assert completion_request({"prompt": ["a", "b"], "best_of": 1}, LIMITS).per_prompt == 1
    for body, field in [({"prompt": []}, "prompt"), ({"prompt": [1, "a"]}, "prompt"),
                        ({"prompt": "a", "best_of": 3}, "best_of"), ({"prompt": "a", "suffix": "z"}, "suffix"),
                        ({"prompt": "a", "echo": True, "logprobs": 1}, "echo"),
                        ({"prompt": "a", "logprobs": 21}, "logprobs")]:
        assert refused(completion_request, body).field == field


def test_error_envelopes():
    status, body, headers = from_gateway_error(GatewayError(
        grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p must be in (0, 1], got 2", "sampling.top_p"))
    assert (status, headers) == (400, {})
    assert body == {"error": {"message": "top_p must be in (0, 1], got 2", "type": "invalid_request_error",
                              "param": "top_p", "code": "invalid_value"}}
    assert error_body(grpc.StatusCode.INVALID_ARGUMENT, "thinking.budget must be in [0, 2**31), got -1",
                      "thinking.budget")[1]["error"]["param"] == "thinking_token_budget"
    assert error_body(grpc.StatusCode.INVALID_ARGUMENT, "messages is 9 tokens; the maximum context length is 8",
                      "messages")[1]["error"]["code"] == "context_length_exceeded"
    assert error_body(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")[:3:2] == (429, {"Retry-After": "1"})
    assert error_body(grpc.StatusCode.UNAVAILABLE, "no worker")[0] == 503
    assert error_body(grpc.StatusCode.ALREADY_EXISTS, "dup")[2] == {"x-should-retry": "false"}
    assert error_body(grpc.StatusCode.DEADLINE_EXCEEDED, "late")[0] == 504


def _msg(reasoning="", content="", calls=(), finish=None, stop=None) -> gateway_pb2.ChatResponse:
    m = gateway_pb2.ChatResponse(delta=gateway_pb2.ChatDelta(reasoning_content=reasoning, content=content))
    for c in calls:
        m.delta.tool_calls.add(**c)
    if finish:
        m.finish.finish_reason = finish
        if stop:
            m.finish.stop_str = stop
        m.usage.prompt_tokens, m.usage.completion_tokens, m.usage.reasoning_tokens = 10, 5, 2
    return m


def test_chat_chunks_and_body():
    r = chat(stream=True, stream_reasoning=False, no_stop_trim=True)
    fmt = ChatFormatter(r, created=7)
    assert fmt.role_chunks()[0]["choices"][0]["delta"] == {"role": "assistant", "content": "",
                                                          "reasoning_content": None}
    assert fmt.chunks(0, _msg(reasoning="thin")) == []  # held back while reasoning streams are off
    (c,) = fmt.chunks(0, _msg(reasoning="king", content="Hi"))
    assert c["choices"][0]["delta"] == {"reasoning_content": "thinking", "content": "Hi"}
    (c,) = fmt.chunks(0, _msg(calls=[{"index": 0, "id": "call_1", "name": "f", "arguments": ""}]))
    assert c["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]
    (c,) = fmt.chunks(0, _msg(calls=[{"index": 0, "arguments": '{"a"'}]))
    assert c["choices"][0]["delta"]["tool_calls"] == [{"index": 0, "function": {"arguments": '{"a"'}}]
    last = fmt.chunks(0, _msg(finish="stop", stop="END"))
    assert last[0]["choices"][0]["delta"] == {"reasoning_content": None, "content": "END"}  # no_stop_trim
    assert last[1]["choices"][0] == {"index": 0, "delta": {"reasoning_content": None}, "logprobs": None,
                                     "finish_reason": "stop", "matched_stop": "END"}
    assert fmt.usage_chunk()["usage"] == {
        "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 2}, "reasoning_tokens": 2}
    both = ChatFormatter(chat(), created=7, reasoning_field="both")
    body = both.body([_msg(reasoning="r", calls=[{"index": 0, "id": "call_1", "name": "f", "arguments": "{}"}],
                           finish="tool_calls")])
    msg = body["choices"][0]["message"]
    assert msg["content"] is None and msg["reasoning_content"] == msg["reasoning"] == "r"
    assert msg["tool_calls"] == [{"id": "call_1", "index": 0, "type": "function",
                                  "function": {"name": "f", "arguments": "{}"}}]
    with pytest.raises(GatewayError):  # a worker's abort is an error, never finish_reason "abort"
        fmt.body([_msg(finish="abort")])


def test_completion_chunks_and_body():
    r = completion_request({"prompt": "count:", "echo": True, "stream": True}, LIMITS)
    fmt = CompletionFormatter(r, created=1, echo_texts=["count:"], per_prompt=1)
    assert fmt.echo_chunks()[0]["choices"][0]["text"] == "count:"
    msg = gateway_pb2.GenerateResponse(text=" one")
    assert fmt.chunks(0, msg)[0]["choices"][0] == {"index": 0, "text": " one", "logprobs": None,
                                                   "finish_reason": None}
    r = completion_request({"prompt": "x", "logprobs": 1}, LIMITS)
    fmt = CompletionFormatter(r, created=1, echo_texts=[""], per_prompt=1)
    final = gateway_pb2.GenerateResponse(text="ab")
    t = final.logprobs.add(token="a", logprob=-1.0)
    t.top_logprobs.add(token="a", logprob=-1.0)
    final.logprobs.add(token="b", logprob=-2.0)
    final.finish.finish_reason = "length"
    body = fmt.body([final])
    assert body["choices"][0]["logprobs"] == {"tokens": ["a", "b"], "token_logprobs": [-1.0, -2.0],
                                              "top_logprobs": [{"a": -1.0}, {}], "text_offset": [0, 1]}
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] == "length"
