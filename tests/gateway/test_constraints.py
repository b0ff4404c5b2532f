"""Structured-output fields on both surfaces: what reaches the workers, and every bad input refused
with INVALID_ARGUMENT naming the public field."""

from __future__ import annotations

import json

import grpc
import pytest

from common.serving.sampling_params import Grammar
from gateway import constraints
from gateway.calls import Constraint, RequestLimits
from gateway.convert import chat_call, generate_call
from gateway.errors import GatewayError
from gateway.openai_request import Limits, chat_request, completion_request
from protos import gateway_pb2

USER = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}}, "required": ["name"]}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


def _http_chat(**body):
    return chat_request({"messages": USER, **body}, Limits()).calls[0].sampling.constraint


def _http_completion(**body):
    return completion_request({"prompt": "x", **body}, Limits()).calls[0].sampling.constraint


def _refused(fn, *args) -> GatewayError:
    with pytest.raises(GatewayError) as e:
        fn(*args)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.message.startswith(e.value.field)  # the message names the field it blames
    return e.value


def test_http_chat_fields_become_the_worker_grammar():
    rf = _http_chat(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA,
                                                                            "strict": True}})
    assert rf == Constraint(Grammar("json_schema", json.dumps(SCHEMA, separators=(",", ":"))),
                            "response_format.json_schema.schema")
    assert _http_chat(response_format={"type": "json_object"}) == Constraint(Grammar("json_object"),
                                                                             "response_format.type")
    assert _http_chat(response_format={"type": "text"}) is None
    assert _http_chat(regex="[a-z]+") == Constraint(Grammar("regex", "[a-z]+"), "regex")
    assert _http_chat(ebnf='root ::= "yes" | "no"') == Constraint(Grammar("ebnf", 'root ::= "yes" | "no"'), "ebnf")
    assert _http_chat(json_schema=json.dumps(SCHEMA)).grammar.kind == "json_schema"
    assert _http_chat() is None
    # SGLang spells the schema key `schema_` in its pydantic model; both are read
    assert _http_chat(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema_": SCHEMA}}
                      ).grammar.kind == "json_schema"


def test_http_completion_fields_and_every_choice_carries_the_constraint():
    assert _http_completion(json_schema=SCHEMA).field == "json_schema"
    assert _http_completion(regex=r"\d{3}").grammar == Grammar("regex", r"\d{3}")
    assert _http_completion(response_format={"type": "json_object"}).grammar.kind == "json_object"
    r = chat_request({"messages": USER, "n": 3, "regex": "a|b"}, Limits())
    assert {c.sampling.constraint.grammar.source for c in r.calls} == {"a|b"}


@pytest.mark.parametrize("body, field", [
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": 3, "schema": {}}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}},
     "response_format.json_schema.strict"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strng"}}}},
     "response_format.json_schema.schema.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {
        "properties": {"a": {"minLength": -1}}}}}}, "response_format.json_schema.schema.properties.a.minLength"),
    ({"json_schema": "{not json"}, "json_schema"),
    ({"json_schema": 5}, "json_schema"),
    ({"regex": "a(b"}, "regex"),
    ({"regex": ""}, "regex"),
    ({"regex": ["a"]}, "regex"),
    ({"ebnf": "start ::= \"a\""}, "ebnf"),
    ({"ebnf": "   "}, "ebnf"),
    ({"regex": "a" * (constraints.MAX_SOURCE_CHARS + 1)}, "regex"),
])
def test_http_bad_constraints_name_the_field(body, field):
    assert _refused(chat_request, {"messages": USER, **body}, Limits()).field == field


def test_at_most_one_constraint_naming_both_fields():
    e = _refused(chat_request, {"messages": USER, "response_format": {"type": "json_object"}, "regex": "a"}, Limits())
    assert e.field == "response_format.type" and "regex" in e.message
    e = _refused(completion_request, {"prompt": "x", "regex": "a", "ebnf": 'root ::= "a"'}, Limits())
    assert e.field == "regex" and "ebnf" in e.message


def test_a_constraint_and_a_forced_tool_choice_are_refused_but_auto_tools_are_not():
    for choice in ("required", {"type": "function", "function": {"name": "f"}}):
        e = _refused(chat_request, {"messages": USER, "tools": [TOOL], "tool_choice": choice, "regex": "a"}, Limits())
        assert e.field == "regex" and "tool_choice" in e.message
    assert _http_chat(tools=[TOOL], response_format={"type": "json_object"}).grammar.kind == "json_object"


def _grpc_chat(**kw) -> gateway_pb2.ChatRequest:
    return gateway_pb2.ChatRequest(messages=[gateway_pb2.ChatMessage(role="user", content="hi")], **kw)


def test_grpc_chat_and_generate_fields():
    rf = gateway_pb2.ResponseFormat(type="json_schema", json_schema=gateway_pb2.JsonSchemaFormat(name="p"))
    rf.json_schema.schema.update(SCHEMA)
    got = chat_call(_grpc_chat(response_format=rf), RequestLimits()).sampling.constraint
    assert got.field == "response_format.json_schema.schema"
    assert json.loads(got.grammar.source) == SCHEMA  # Struct's doubles come back as the schema's ints
    got = chat_call(_grpc_chat(sampling=gateway_pb2.SamplingParams(regex="x+")), RequestLimits()).sampling.constraint
    assert got == Constraint(Grammar("regex", "x+"), "sampling.regex")
    gen = generate_call(gateway_pb2.GenerateRequest(text="a", sampling=gateway_pb2.SamplingParams(
        json_schema=json.dumps(SCHEMA))), RequestLimits())
    assert gen.sampling.constraint.field == "sampling.json_schema"
    gen = generate_call(gateway_pb2.GenerateRequest(text="a", sampling=gateway_pb2.SamplingParams(
        ebnf='root ::= "a"')), RequestLimits())
    assert gen.sampling.constraint.grammar == Grammar("ebnf", 'root ::= "a"')
    assert chat_call(_grpc_chat(response_format=gateway_pb2.ResponseFormat(type="text")),
                     RequestLimits()).sampling.constraint is None


@pytest.mark.parametrize("make, field", [
    (lambda: _grpc_chat(response_format=gateway_pb2.ResponseFormat()), "response_format.type"),
    (lambda: _grpc_chat(response_format=gateway_pb2.ResponseFormat(type="json_schema")), "response_format.json_schema"),
    (lambda: _grpc_chat(response_format=gateway_pb2.ResponseFormat(
        type="json_schema", json_schema=gateway_pb2.JsonSchemaFormat(name="x"))), "response_format.json_schema.schema"),
    (lambda: _grpc_chat(sampling=gateway_pb2.SamplingParams(json_schema="[")), "sampling.json_schema"),
    (lambda: _grpc_chat(sampling=gateway_pb2.SamplingParams(regex="(")), "sampling.regex"),
    (lambda: _grpc_chat(sampling=gateway_pb2.SamplingParams(ebnf="")), "sampling.ebnf"),
    (lambda: _grpc_chat(sampling=gateway_pb2.SamplingParams(regex="a", ebnf='root ::= "a"')), "sampling.regex"),
    (lambda: _grpc_chat(response_format=gateway_pb2.ResponseFormat(type="json_object"),
                        sampling=gateway_pb2.SamplingParams(regex="a")), "response_format.type"),
])
def test_grpc_bad_constraints_name_the_field(make, field):
    assert _refused(chat_call, make(), RequestLimits()).field == field


def test_grpc_parallel_tool_calls():
    tool = gateway_pb2.Tool(function=gateway_pb2.FunctionDefinition(name="f"))
    required = gateway_pb2.ToolChoice(mode=gateway_pb2.TOOL_CHOICE_REQUIRED)
    assert chat_call(_grpc_chat(tools=[tool], tool_choice=required), RequestLimits()).parallel_tool_calls
    assert not chat_call(_grpc_chat(tools=[tool], tool_choice=required, parallel_tool_calls=False),
                         RequestLimits()).parallel_tool_calls


def test_grpc_constraint_with_a_named_tool_is_refused():
    tool = gateway_pb2.Tool(function=gateway_pb2.FunctionDefinition(name="f"))
    req = _grpc_chat(tools=[tool], tool_choice=gateway_pb2.ToolChoice(function=gateway_pb2.NamedFunction(name="f")),
                     sampling=gateway_pb2.SamplingParams(regex="a"))
    assert _refused(chat_call, req, RequestLimits()).field == "sampling.regex"


def test_worker_refusals_are_renamed_to_the_public_field():
    c = Constraint(Grammar("json_schema", "{}"), "response_format.json_schema.schema")
    worker = GatewayError(grpc.StatusCode.INVALID_ARGUMENT, "decode worker d0: json_schema: unsupported keyword")
    renamed = constraints.worker_refusal(worker, c)
    assert renamed.code == grpc.StatusCode.INVALID_ARGUMENT and renamed.field == "response_format.json_schema.schema"
    assert renamed.message.startswith("response_format.json_schema.schema ") and "unsupported keyword" in renamed.message
    other = GatewayError(grpc.StatusCode.INVALID_ARGUMENT, "decode worker d0: sampling.top_p must be in (0, 1]")
    assert constraints.worker_refusal(other, c) is other  # not about the grammar: unchanged
    internal = GatewayError(grpc.StatusCode.INTERNAL, "json_schema crashed")
    assert constraints.worker_refusal(internal, c) is internal
    tool = constraints.worker_refusal(GatewayError(grpc.StatusCode.INVALID_ARGUMENT, "ebnf: bad rule"),
                                      Constraint(Grammar("ebnf", 'root ::= "a"'), None))
    assert tool.code == grpc.StatusCode.INTERNAL and "tool-call grammar" in tool.message


def test_check_applied_outcomes():
    from protos import worker_pb2

    c = Constraint(Grammar("regex", "a+"), "regex")
    chunk = worker_pb2.DecodeChunk(completion_tokens=5, grammar_tokens=4)
    assert constraints.check_applied(c, chunk, None, 5, True) == "applied"
    first_only = worker_pb2.DecodeChunk(completion_tokens=1)
    assert constraints.check_applied(c, first_only, worker_pb2.PrefillResult(grammar_applied=True), 1, True) == \
        "applied"
    none = worker_pb2.DecodeChunk(completion_tokens=6)
    assert constraints.check_applied(c, none, worker_pb2.PrefillResult(), 0, True) == "not_reached"
    assert constraints.check_applied(c, none, None, 6, False) == "unverified"
    with pytest.raises(GatewayError) as e:
        constraints.check_applied(c, none, worker_pb2.PrefillResult(), 6, True)
    assert e.value.code == grpc.StatusCode.INTERNAL and "without applying the regex constraint" in e.value.message
