"""Per-request caps: each refusal names the field and the flag, and gRPC and HTTP refuse the same
request with the same message (both go through checks.py); the concurrency gate gives its slots back
on every exit."""

from __future__ import annotations

import grpc
import pytest

from gateway import convert
from gateway.calls import RequestLimits
from gateway.checks import check_prompt_chars
from gateway.errors import GatewayError
from gateway.openai_request import Limits, chat_request, completion_request
from gateway.pipeline import Admission
from protos import gateway_pb2

CAPS = RequestLimits(max_stop_strings=3, max_stop_string_chars=5, max_tools=2, max_tools_bytes=300)
HTTP = Limits(max_n=8, max_concurrent=6, request=CAPS)
USER = [{"role": "user", "content": "hi"}]


def tool(name: str, description: str = "") -> dict:
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": {"type": "object", "properties": {}}}}


def grpc_chat(**body) -> gateway_pb2.ChatRequest:
    req = gateway_pb2.ChatRequest(messages=[gateway_pb2.ChatMessage(role="user", content="hi")])
    req.sampling.stop.extend(body.get("stop", []))
    for t in body.get("tools", []):
        pt = req.tools.add(type="function")
        pt.function.name = t["function"]["name"]
        pt.function.description = t["function"]["description"]
        pt.function.parameters.update(t["function"]["parameters"])
    return req


def refusal(fn, *a) -> GatewayError:
    with pytest.raises(GatewayError) as ei:
        fn(*a)
    assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return ei.value


@pytest.mark.parametrize("body,field,message", [
    ({"stop": ["a", "b", "c", "d"]}, "stop", "has 4 strings; at most 3 are accepted (--max-stop-strings)"),
    ({"stop": ["a", "toolong"]}, "stop[1]", "is 7 characters; at most 5 are accepted (--max-stop-string-chars)"),
    ({"tools": [tool("a"), tool("b"), tool("c")]}, "tools", "has 3 tools; at most 2 are accepted (--max-tools)"),
    ({"tools": [tool("a", "x" * 250)]}, "tools", "bytes as JSON; at most 300 are accepted (--max-tools-bytes)"),
])
def test_grpc_and_http_refuse_alike(body, field, message):
    over_grpc = refusal(convert.chat_call, grpc_chat(**body), CAPS)
    over_http = refusal(chat_request, {"messages": USER, **body}, HTTP)
    assert message in over_grpc.message
    grpc_field = "sampling." + field if field.startswith("stop") else field
    assert (over_grpc.field, over_http.field) == (grpc_field, field)
    assert over_grpc.message == "sampling." + over_http.message if field.startswith("stop") \
        else over_grpc.message == over_http.message


def test_at_the_limit_is_accepted():
    body = {"stop": ["a", "b", "12345"], "tools": [tool("a"), tool("b")]}
    call = convert.chat_call(grpc_chat(**body), CAPS)
    assert call.sampling.stop == ("a", "b", "12345") and len(call.tools) == 2
    assert chat_request({"messages": USER, **body}, HTTP).calls[0].sampling.stop == ("a", "b", "12345")
    assert len(convert.generate_call(gateway_pb2.GenerateRequest(
        text="x", sampling=gateway_pb2.SamplingParams(stop=["a", "b", "c"])), CAPS).sampling.stop) == 3


def test_multibyte_tools_count_bytes_not_characters():
    ok = tool("a", "é" * 90)      # about 100 bytes of JSON around 180 bytes of description: under 300
    over = tool("a", "é" * 110)   # 220 bytes (but 110 characters) + the rest: over
    assert chat_request({"messages": USER, "tools": [ok]}, HTTP).calls[0].tools
    assert "(--max-tools-bytes)" in refusal(chat_request, {"messages": USER, "tools": [over]}, HTTP).message


def test_sequences_over_the_concurrency_cap_are_too_big_not_busy():
    assert "runs at most 6 at once (--max-concurrent-requests)" in \
        refusal(chat_request, {"messages": USER, "n": 7}, HTTP).message
    err = refusal(completion_request, {"prompt": ["a", "b", "c", "d"], "n": 2}, HTTP)
    assert err.field == "prompt" and "asks for 8 sequences" in err.message
    assert len(completion_request({"prompt": ["a", "b", "c"], "n": 2}, HTTP).calls) == 6
    assert len(chat_request({"messages": USER, "n": 8}, Limits(max_n=8)).calls) == 8  # 0: no cap


def test_prompt_chars():
    check_prompt_chars(10, 10, "messages")
    err = refusal(check_prompt_chars, 11, 10, "prompt")
    assert err.field == "prompt"
    assert err.message == "prompt is 11 characters; at most 10 are accepted before tokenising (--max-prompt-chars)"


def test_admission_releases_on_every_exit():
    gate = Admission(3)
    with gate.slots(2):
        with pytest.raises(GatewayError) as ei, gate.slots(2):
            pass
        assert ei.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "(--max-concurrent-requests)" in ei.value.message
        assert gate.running == 2  # a refusal takes nothing
        with pytest.raises(ValueError), gate.slots(1):
            assert gate.running == 3
            raise ValueError
    assert gate.running == 0
    unlimited = Admission(0)
    with unlimited.slots(10_000):
        assert unlimited.running == 10_000
