"""Bad requests get INVALID_ARGUMENT (or the right code) naming the field; the gateway keeps serving."""

from __future__ import annotations

import grpc
import pytest

from protos import gateway_pb2
from tests.service.gateway_harness import (
    WEATHER_TOOL,
    Script,
    chat_request,
    collect,
    gateway_with_fakes,
    run,
)

Code = grpc.StatusCode


def _user(text: str) -> gateway_pb2.ChatMessage:
    return gateway_pb2.ChatMessage(role="user", content=text)


def _bad_tool_args() -> gateway_pb2.ChatRequest:
    call = gateway_pb2.ToolCall(id="call_1", type="function",
                                function=gateway_pb2.FunctionCall(name="get_weather", arguments='{"city": '))
    return gateway_pb2.ChatRequest(messages=[
        _user("Weather?"),
        gateway_pb2.ChatMessage(role="assistant", tool_calls=[call]),
        gateway_pb2.ChatMessage(role="tool", content="sunny", tool_call_id="call_1"),
    ], tools=[WEATHER_TOOL])


CASES = [
    ("bad role", gateway_pb2.ChatRequest(messages=[gateway_pb2.ChatMessage(role="wizard", content="hi")]),
     Code.INVALID_ARGUMENT, "messages[0].role"),
    ("no messages", gateway_pb2.ChatRequest(), Code.INVALID_ARGUMENT, "messages must not be empty"),
    ("tool-call arguments not JSON", _bad_tool_args(), Code.INVALID_ARGUMENT,
     "messages[1].tool_calls[0].function.arguments must be valid JSON"),
    ("top_p out of range", chat_request(sampling=gateway_pb2.SamplingParams(top_p=1.5)), Code.INVALID_ARGUMENT,
     "sampling.top_p must be in (0, 1]"),
    ("top_p zero", chat_request(sampling=gateway_pb2.SamplingParams(top_p=0.0)), Code.INVALID_ARGUMENT,
     "sampling.top_p must be in (0, 1]"),
    ("negative temperature", chat_request(sampling=gateway_pb2.SamplingParams(temperature=-1)),
     Code.INVALID_ARGUMENT, "sampling.temperature must be >= 0"),
    ("max_tokens above the server limit", chat_request(sampling=gateway_pb2.SamplingParams(max_tokens=5000)),
     Code.INVALID_ARGUMENT, "sampling.max_tokens must be <= 1024"),
    ("max_tokens zero", chat_request(sampling=gateway_pb2.SamplingParams(max_tokens=0)), Code.INVALID_ARGUMENT,
     "sampling.max_tokens must be >= 1"),
    ("prompt + max_tokens beyond the context", chat_request("hello " * 1100,
                                                           sampling=gateway_pb2.SamplingParams(max_tokens=1000)),
     Code.INVALID_ARGUMENT, "exceeds the maximum context length 4096"),
    ("prompt too long", chat_request("hello " * 5000), Code.INVALID_ARGUMENT,
     "the maximum context length is 4096"),
    ("empty stop string", chat_request(sampling=gateway_pb2.SamplingParams(stop=["a", ""])), Code.INVALID_ARGUMENT,
     "sampling.stop[1] must not be empty"),
    ("top_logprobs without logprobs", chat_request(top_logprobs=3), Code.INVALID_ARGUMENT, "top_logprobs needs"),
    ("logit bias out of vocab", chat_request(sampling=gateway_pb2.SamplingParams(logit_bias={10**6: 1.0})),
     Code.INVALID_ARGUMENT, "sampling.logit_bias"),
    ("custom processor without the flag", chat_request(custom_logit_processor="glm4_moe_thinking_budget"),
     Code.INVALID_ARGUMENT, "--enable-custom-logit-processor"),
    ("tool_choice names an unknown tool", chat_request(
        tools=[WEATHER_TOOL], tool_choice=gateway_pb2.ToolChoice(function=gateway_pb2.NamedFunction(name="nope"))),
     Code.INVALID_ARGUMENT, "tool_choice.function.name"),
    ("thinking conflicts with template kwargs", gateway_pb2.ChatRequest(
        messages=[_user("hi")], thinking=gateway_pb2.Thinking(enabled=True),
        chat_template_kwargs={"enable_thinking": False}), Code.INVALID_ARGUMENT, "thinking.enabled conflicts"),
    ("unknown model", chat_request(model="gpt-5"), Code.NOT_FOUND, "'gpt-5' is not served"),
]


def test_bad_requests_name_the_field_and_the_gateway_keeps_serving(model_dir, tok):
    ids = tok.encode("fine") + [tok.token_id("<|endoftext|>")]
    script = Script(chunks=[ids], finish_token=ids[-1])

    async def scenario():
        results = []
        async with gateway_with_fakes(model_dir, lambda r: script) as h:
            for name, req, _, _ in CASES:
                try:
                    await collect(h.stub.Chat(req))
                    results.append((name, None, "no error"))
                except grpc.aio.AioRpcError as e:
                    results.append((name, e.code(), e.details()))
            _, ok = await collect(h.stub.Chat(chat_request(thinking=gateway_pb2.Thinking(enabled=False))))
            return results, ok, len(h.cluster.decodes[0].requests)

    results, ok, n_dispatched = run(scenario())
    for (name, _, code, needle), (_, got_code, details) in zip(CASES, results):
        assert got_code == code, (name, got_code, details)
        assert needle in details, (name, details)
    assert ok["content"] == "fine"          # still serving
    assert n_dispatched == 1                # no invalid request reached a worker


def test_generate_input_validation(model_dir, tok):
    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: Script()) as h:
            errs = []
            for req in (gateway_pb2.GenerateRequest(),
                        gateway_pb2.GenerateRequest(tokens=gateway_pb2.TokenIds(ids=[1, 2, 10**6])),
                        gateway_pb2.GenerateRequest(text="hi", sampling=gateway_pb2.SamplingParams(min_p=2))):
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    [m async for m in h.stub.Generate(req)]
                errs.append((ei.value.code(), ei.value.details()))
            return errs

    errs = run(scenario())
    assert errs[0] == (Code.INVALID_ARGUMENT, "input must be set: text or tokens")
    assert errs[1][0] == Code.INVALID_ARGUMENT and errs[1][1].startswith("tokens.ids[2] must be < vocab size")
    assert errs[2][0] == Code.INVALID_ARGUMENT and errs[2][1].startswith("sampling.min_p must be in [0, 1]")


def test_oversized_request_is_refused_by_the_message_size_limit(model_dir):
    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: Script(), max_message_bytes=64 * 1024) as h:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await collect(h.stub.Chat(chat_request("x" * 100_000)))
            info = await h.stub.GetModelInfo(gateway_pb2.GetModelInfoRequest())  # still serving
            return ei.value, info

    err, info = run(scenario())
    assert err.code() == Code.RESOURCE_EXHAUSTED
    assert info.served_model_name == "glm-test"


def test_worker_errors_map_to_the_client_status(model_dir, tok):
    async def scenario():
        out = {}
        async with gateway_with_fakes(model_dir, lambda r: Script()) as h:
            for code in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "INTERNAL"):
                h.cluster.decodes[0].script_for = lambda r, c=code: Script(chunks=[[5]], decode_error=c)
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await collect(h.stub.Chat(chat_request()))
                out[code] = (ei.value.code(), ei.value.details())
        return out

    out = run(scenario())
    assert out["INVALID_ARGUMENT"][0] == Code.INVALID_ARGUMENT
    assert "decode worker" in out["INVALID_ARGUMENT"][1] and "scripted decode failure" in out["INVALID_ARGUMENT"][1]
    assert out["RESOURCE_EXHAUSTED"][0] == Code.RESOURCE_EXHAUSTED  # retried, then reported as is
    assert out["INTERNAL"][0] == Code.INTERNAL and "INTERNAL" in out["INTERNAL"][1]


def test_no_reachable_worker_is_unavailable(model_dir):
    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: Script(), n_decode=0,
                                      extra_decode=["127.0.0.1:1"]) as h:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await collect(h.stub.Chat(chat_request()))
            return ei.value

    err = run(scenario())
    assert err.code() == Code.UNAVAILABLE
    assert "no healthy decode worker" in err.details() and "127.0.0.1:1 (down)" in err.details()
