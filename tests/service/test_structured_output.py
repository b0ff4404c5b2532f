"""Structured output through the real gateway (gRPC and HTTP with the openai client) and scripted
fake workers: each constraint reaches both workers as the GrammarSpec the client asked for; a worker's
refusal comes back naming the public field; an answer the workers did not report as constrained
fails (never a silently unconstrained answer); tool_choice required / named send the tool grammar."""

from __future__ import annotations

import json

import grpc
import openai
import pytest
from prometheus_client import REGISTRY

from protos import gateway_pb2
from tests.service.gateway_harness import Script, chat_request, chunked, collect, gateway_with_fakes, run
from tests.service.test_http_openai import USER, client

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
          "required": ["answer"]}
JSON_ANSWER = '{"answer": "yes"}'


def _script(tok, text: str, **kw) -> Script:
    ids = tok.encode(text) + [tok.token_id("<|observation|>")]
    return Script(chunks=chunked(ids, [2]), finish_token=ids[-1], **kw)


def _count(outcome: str) -> float:
    return REGISTRY.get_sample_value("glmserve_grammar_requests_total", {"outcome": outcome}) or 0.0


def _grammars(h) -> list[tuple[str | None, str | None]]:
    """(prefill's, decode's) grammar kind per request, in order."""
    def kind(r):
        return r.sampling.grammar.WhichOneof("kind") if r.sampling.HasField("grammar") else None
    return [(kind(p), kind(d)) for p, d in zip(h.cluster.prefills[0].requests, h.cluster.decodes[0].requests)]


def test_grpc_constraints_reach_both_workers_and_are_counted_applied(model_dir, tok):
    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: _script(tok, JSON_ANSWER)) as h:
            rf = gateway_pb2.ResponseFormat(type="json_schema")
            rf.json_schema.name = "verdict"
            rf.json_schema.schema.update(SCHEMA)
            _, chat = await collect(h.stub.Chat(chat_request(
                "yes or no?", response_format=rf, chat_template_kwargs=_no_thinking())))
            gen = [m async for m in h.stub.Generate(gateway_pb2.GenerateRequest(
                text="Digits:", sampling=gateway_pb2.SamplingParams(regex="[0-9]+", max_tokens=8)))]
            plain = [m async for m in h.stub.Generate(gateway_pb2.GenerateRequest(text="free"))]
            return h, chat, gen, plain, h.cluster.decodes[0].requests

    before = _count("applied")
    h, chat, gen, plain, sent = run(scenario())
    assert json.loads(chat["content"]) == {"answer": "yes"}
    assert _grammars(h) == [("json_schema", "json_schema"), ("regex", "regex"), (None, None)]
    assert json.loads(sent[0].sampling.grammar.json_schema) == SCHEMA
    assert sent[1].sampling.grammar.regex == "[0-9]+"
    assert not sent[0].sampling.reasoning_first  # thinking off: the grammar applies from the first token
    assert gen[-1].finish.finish_reason and plain[-1].finish.finish_reason
    assert _count("applied") == before + 2  # the unconstrained request is not counted


def _no_thinking():
    from google.protobuf import struct_pb2
    s = struct_pb2.Struct()
    s.update({"enable_thinking": False})
    return s


def test_an_answer_the_workers_did_not_constrain_fails_internal(model_dir, tok):
    """A worker that ignores the grammar (an old build, a lost field) must not yield an answer that
    looks constrained: the request fails with INTERNAL and the drop is counted."""
    def script_for(r):
        text = tok.decode(list(r.input_ids))
        if "reasoning only" in text:  # thinking on, every token spent reasoning: nothing to constrain
            return _script(tok, "<think>still thinking about it", grammar_reports=False)
        return _script(tok, JSON_ANSWER, grammar_reports=False)

    async def scenario():
        async with gateway_with_fakes(model_dir, script_for) as h:
            with pytest.raises(grpc.aio.AioRpcError) as dropped:
                await collect(h.stub.Chat(chat_request(
                    "yes or no?", response_format=gateway_pb2.ResponseFormat(type="json_object"),
                    chat_template_kwargs=_no_thinking(), stream=False)))
            _, reasoning = await collect(h.stub.Chat(chat_request(
                "reasoning only", response_format=gateway_pb2.ResponseFormat(type="json_object"))))
            return dropped.value, reasoning

    dropped_before, not_reached_before = _count("dropped"), _count("not_reached")
    err, reasoning = run(scenario())
    assert err.code() == grpc.StatusCode.INTERNAL and "without applying the json_object constraint" in err.details()
    assert reasoning["reasoning"] and not reasoning["content"]
    assert _count("dropped") == dropped_before + 1 and _count("not_reached") == not_reached_before + 1


def test_a_worker_refusing_the_grammar_names_the_public_field(model_dir, tok):
    def script_for(r):
        return Script(decode_error="INVALID_ARGUMENT", decode_error_message="json_schema does not compile: "
                      "unsupported keyword 'patternProperties'")

    async def scenario():
        async with gateway_with_fakes(model_dir, script_for) as h, client(h) as c:
            with pytest.raises(grpc.aio.AioRpcError) as grpc_err:
                await collect(h.stub.Generate(gateway_pb2.GenerateRequest(
                    text="x", sampling=gateway_pb2.SamplingParams(json_schema='{"patternProperties": {}}'))))
            with pytest.raises(openai.BadRequestError) as http_err:
                await c.chat.completions.create(model="m", messages=USER, response_format={
                    "type": "json_schema", "json_schema": {"name": "x", "schema": {"patternProperties": {}}}})
            return grpc_err.value, http_err.value

    g, http = run(scenario())
    assert g.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert g.details().startswith("sampling.json_schema was refused by the grammar backend") and \
        "patternProperties" in g.details()
    assert http.status_code == 400 and http.body["param"] == "response_format.json_schema.schema"


def test_openai_client_response_format_and_tool_grammars(model_dir, tok):
    call_text = ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
                 "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>")

    def script_for(r):
        tools = r.sampling.grammar.ebnf or r.sampling.grammar.structural_tag
        return _script(tok, "<think>ok</think>" + call_text if tools else JSON_ANSWER)

    strict = {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
        "required": ["city"]}}}
    loose = json.loads(json.dumps(strict))
    del loose["function"]["strict"]

    async def scenario():
        async with gateway_with_fakes(model_dir, script_for) as h, client(h) as c:
            fmt = await c.chat.completions.create(
                model="m", messages=USER, response_format={"type": "json_schema", "json_schema": {
                    "name": "verdict", "schema": SCHEMA, "strict": True}},
                extra_body={"chat_template_kwargs": {"enable_thinking": False}})
            named = await c.chat.completions.create(
                model="m", messages=USER, tools=[loose],
                tool_choice={"type": "function", "function": {"name": "get_weather"}})
            one = await c.chat.completions.create(model="m", messages=USER, tools=[loose], tool_choice="required",
                                                  parallel_tool_calls=False)
            many = await c.chat.completions.create(model="m", messages=USER, tools=[loose], tool_choice="required")
            strict_ok = json.loads(json.dumps(strict))
            del strict_ok["function"]["parameters"]["properties"]["days"]["minimum"]
            auto_strict = await c.chat.completions.create(model="m", messages=USER, tools=[strict_ok, relaxed_time()])
            await c.chat.completions.create(model="m", messages=USER, tools=[loose])  # auto, nothing strict
            with pytest.raises(openai.BadRequestError) as refused:
                await c.chat.completions.create(model="m", messages=USER, tools=[strict], tool_choice="required")
            with pytest.raises(openai.BadRequestError) as both:
                await c.chat.completions.create(model="m", messages=USER, tools=[loose], tool_choice="required",
                                                response_format={"type": "json_object"})
            return fmt, named, one, many, refused.value, both.value, h.cluster.decodes[0].requests, auto_strict

    fmt, named, one, many, refused, both, sent, auto_strict = run(scenario())
    assert json.loads(fmt.choices[0].message.content) == {"answer": "yes"}
    (tc,) = named.choices[0].message.tool_calls
    assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Paris", "days": 2}
    assert named.choices[0].message.reasoning_content == "ok"
    ebnf = sent[1].sampling.grammar.ebnf
    assert "<tool_call>get_weather\\n" in ebnf and sent[1].sampling.reasoning_first and not sent[1].sampling.forced_prefix
    assert refused.status_code == 400
    assert refused.body["param"] == "tools[get_weather].function.parameters.properties.days.minimum"
    assert both.status_code == 400 and both.body["param"] == "response_format.type"
    # parallel_tool_calls false: exactly one call, as for a named tool; otherwise one or more
    roots = [s.sampling.grammar.ebnf.splitlines()[0] for s in sent[1:4]]
    assert roots[0] == roots[1] and roots[0].startswith("root ::=") and not roots[0].endswith("*")
    assert roots[2].endswith(")*")
    assert all(json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris", "days": 2}
               for r in (one, many))
    # auto: a strict tool makes a structural tag (free text, held calls); without one, nothing is sent
    tag = json.loads(sent[4].sampling.grammar.structural_tag)
    assert [t["begin"] for t in tag["format"]["tags"]] == ["<tool_call>get_weather\n", "<tool_call>get_time\n"]
    assert not sent[5].sampling.HasField("grammar")
    assert auto_strict.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert len(sent) == 6  # the refused requests never reached a worker


def relaxed_time() -> dict:
    return {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def test_streamed_answer_with_thinking_keeps_the_reasoning_free(model_dir, tok):
    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: _script(tok, "<think>hmm</think>" + JSON_ANSWER)) as h, \
                client(h) as c:
            stream = await c.chat.completions.create(model="m", messages=USER, stream=True,
                                                     response_format={"type": "json_object"})
            reasoning, content = "", ""
            async for chunk in stream:
                delta = chunk.choices[0].delta if chunk.choices else None
                reasoning += (getattr(delta, "reasoning_content", None) or "") if delta else ""
                content += (delta.content or "") if delta else ""
            return reasoning, content, h.cluster.decodes[0].requests[0].sampling

    reasoning, content, sent = run(scenario())
    assert reasoning == "hmm" and json.loads(content) == {"answer": "yes"}
    assert sent.reasoning_first and sent.grammar.json_object
