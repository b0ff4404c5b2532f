"""Structured output end to end: real gateway, prefill and decode processes on the tiny random model,
disaggregated (PD) and with EAGLE speculation on. Every constrained answer parses and validates:
JSON schemas (jsonschema), regexes (re.fullmatch), an EBNF grammar, and GLM tool calls under
tool_choice named / required (the glm45 parser's arguments validate against each tool's schema).
The gateway counts each constrained answer as applied only when the workers reported tokens sampled
under the grammar (and fails the request otherwise), so the metric check below proves that every
request path applied its constraint.

The schemas are bounded (enums, maxLength, maxItems, integer ranges) so that the random model, whose
only guidance is the mask, finishes well within max_tokens."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import jsonschema
import openai
import pytest

from common.tools.launch import Cluster
from protos import gateway_pb2, gateway_pb2_grpc
from tests.e2e.conftest import ready_cluster

MAX_TOKENS = 160
TOOL_MAX_TOKENS = 256  # the markup and names are spelled with any tokens the grammar allows, often single bytes
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 4}, "ok": {"type": "boolean"}},
     "required": ["name", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "v": {"const": 1}},
     "required": ["color", "v"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "admin": {"type": "boolean"}},
        "required": ["id", "admin"], "additionalProperties": False}},
     "required": ["user"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1,
                                               "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                          {"type": "null"}]}},
     "required": ["value"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "string", "maxLength": 3}},
     "required": ["a"], "additionalProperties": False},
    {"type": "object", "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5}, "y": {"type": "null"}},
     "required": ["x", "y"], "additionalProperties": False},
    {"type": "array", "items": {"type": "object", "properties": {"k": {"enum": ["x", "y"]}}, "required": ["k"],
                                "additionalProperties": False}, "minItems": 1, "maxItems": 2},
]
REGEXES = [r"(yes|no)", r"[0-9]{3}-[a-z]{2}"]
EBNF = 'root ::= "(" digit ("+" digit){0,2} ")"\ndigit ::= [0-9]\n'
EBNF_AS_REGEX = r"\([0-9](\+[0-9]){0,2}\)"
SET_MODE = {"type": "function", "function": {"name": "set_mode", "strict": True, "parameters": {
    "type": "object", "properties": {"mode": {"type": "string", "enum": ["on", "off"]}, "loud": {"type": "boolean"},
                                     "note": {"type": "string", "maxLength": 3}},
    "required": ["mode", "loud"]}}}
GET_WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 4},
                                     "days": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
    "required": ["city", "days"]}}}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module", params=["pd", "pd+eagle"])
def cluster(request, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    spec = ["--speculative-algorithm", "EAGLE", "--speculative-num-steps", "2", "--speculative-eagle-topk", "1",
            "--speculative-num-draft-tokens", "3"] if request.param == "pd+eagle" else []
    log_dir = tmp_path_factory.mktemp(f"structured_{request.param.replace('+', '_')}")
    with ready_cluster(tiny_model_dir, log_dir, extra_worker_args=spec) as c:
        yield c


def _openai(c: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{c.http_port}/v1", api_key="EMPTY", max_retries=0, timeout=120)


def _applied(c: Cluster) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{c.http_port}/metrics", timeout=10).read().decode()
    m = re.search(r'^glmserve_grammar_requests_total\{outcome="applied"\} ([0-9.e+]+)$', text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def test_constrained_outputs_parse_and_validate(cluster):
    client = _openai(cluster)
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(cluster.gateway_address))
    before = _applied(cluster)
    for i, schema in enumerate(SCHEMAS):  # each request path in turn
        if i % 3 == 0:  # HTTP chat response_format
            r = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"Answer as JSON ({i})."}], max_tokens=MAX_TOKENS,
                seed=i, response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}},
                extra_body=NO_THINKING)
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        elif i % 3 == 1:  # gRPC Generate sampling.json_schema
            text, finish = _generate(stub, f"JSON {i}:", gateway_pb2.SamplingParams(
                json_schema=json.dumps(schema), max_tokens=MAX_TOKENS, seed=i))
        else:  # gRPC Chat response_format
            text, finish = _chat(stub, f"Answer as JSON ({i}).", schema, i)
        assert finish == "stop", (i, text)
        jsonschema.validate(json.loads(text), schema)
    for i, pattern in enumerate(REGEXES):
        text, finish = _generate(stub, f"Pattern {i}:", gateway_pb2.SamplingParams(
            regex=pattern, max_tokens=MAX_TOKENS, seed=i))
        assert finish == "stop" and re.fullmatch(pattern, text), (pattern, text)
    r = client.completions.create(model="m", prompt="Sum:", max_tokens=MAX_TOKENS, seed=3, extra_body={"ebnf": EBNF})
    assert r.choices[0].finish_reason == "stop" and re.fullmatch(EBNF_AS_REGEX, r.choices[0].text), r.choices[0].text
    assert _applied(cluster) == before + len(SCHEMAS) + len(REGEXES) + 1


def test_tool_calls_under_a_grammar_return_schema_valid_typed_arguments(cluster):
    client = _openai(cluster)
    before = _applied(cluster)
    tools = [SET_MODE, GET_WEATHER]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    named = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Turn it on."}], tools=tools, max_tokens=TOOL_MAX_TOKENS, seed=1,
        tool_choice={"type": "function", "function": {"name": "set_mode"}}, extra_body=NO_THINKING)
    # thinking off here: the random model opens no <think> for a budget to close, so with thinking on its
    # reasoning would end only if it sampled </think> by chance; the reasoning gate (free text, then the
    # grammar from the first </think>) is covered by tests/common/test_grammar.py and the worker tests
    required = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Weather?"}], tools=[GET_WEATHER], max_tokens=TOOL_MAX_TOKENS,
        seed=2, tool_choice="required", parallel_tool_calls=False, extra_body=NO_THINKING)
    for r, name in ((named, "set_mode"), (required, "get_weather")):
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.tool_calls, choice.message
        for call in choice.message.tool_calls:
            assert call.function.name == name
            jsonschema.validate(json.loads(call.function.arguments), schemas[name])
    assert _applied(cluster) == before + 2


def _chat(stub: gateway_pb2_grpc.GatewayStub, text: str, schema: dict, seed: int) -> tuple[str, str]:
    req = gateway_pb2.ChatRequest(messages=[gateway_pb2.ChatMessage(role="user", content=text)], stream=False,
                                  sampling=gateway_pb2.SamplingParams(max_tokens=MAX_TOKENS, seed=seed),
                                  response_format=gateway_pb2.ResponseFormat(type="json_schema"))
    req.response_format.json_schema.name = "answer"
    req.response_format.json_schema.schema.update(schema)
    req.chat_template_kwargs.update(NO_THINKING["chat_template_kwargs"])
    (msg,) = list(stub.Chat(req, timeout=120))
    return msg.delta.content, msg.finish.finish_reason


def _generate(stub: gateway_pb2_grpc.GatewayStub, text: str, sampling: gateway_pb2.SamplingParams) -> tuple[str, str]:
    out, finish = "", ""
    for msg in stub.Generate(gateway_pb2.GenerateRequest(text=text, sampling=sampling), timeout=120):
        out += msg.text
        if msg.HasField("finish"):
            finish = msg.finish.finish_reason
    return out, finish
