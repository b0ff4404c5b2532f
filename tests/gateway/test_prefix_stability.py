"""Prefix-stable rendering, for the prefix cache: the same history renders to the same tokens;
inside an agent's tool loop each request's prompt starts with the previous request's whole prompt
(generation prompt included), on both template families; tool schemas render in one order per
API (gRPC: sorted keys, as a Struct keeps none; HTTP: the client's order); and the reuse the
templates leave across turns (benchmarks/serving/template_reuse.py) stays at its measured values
with the tiny tokenizer, so a template or rendering change that lowers it fails here."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from benchmarks.serving.template_reuse import TOOLS, VARIANTS, agent_turns, measure
from common.tools.tiny_tokenizer import write_tokenizer_files
from gateway.calls import RequestLimits
from gateway.chat_template import ChatTemplate
from gateway.convert import chat_tools
from gateway.openai_request import Limits, chat_request
from gateway.tokenizer import Tokenizer
from protos import gateway_pb2

FAMILIES = ("glm45", "glm47")


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[ChatTemplate, Tokenizer]]:
    out = {}
    for name in FAMILIES:
        d: Path = tmp_path_factory.mktemp(name)
        write_tokenizer_files(d, name)
        out[name] = (ChatTemplate.from_dir(d), Tokenizer.from_dir(d))
    return out


def _prompts(template: ChatTemplate, tok: Tokenizer, kwargs: dict) -> list[list[int]]:
    msgs, ends = agent_turns()
    return [tok.encode(template.render(msgs[:end + 1], TOOLS, chat_template_kwargs=kwargs)) for end in ends]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_same_history_renders_to_the_same_tokens(families, family) -> None:
    template, tok = families[family]
    assert _prompts(template, tok, {}) == _prompts(template, tok, {})


@pytest.mark.parametrize("family", FAMILIES)
def test_tool_loop_requests_extend_the_previous_prompt(families, family) -> None:
    """Requests 2, 3 and 5 of the agent script answer a tool result (no new user message): the
    previous prompt, generation prompt included, is a token prefix of the next one."""
    template, tok = families[family]
    p = _prompts(template, tok, {})
    for i in (1, 2, 4):
        assert p[i][:len(p[i - 1])] == p[i - 1], f"request {i + 1} does not extend request {i}"


@pytest.mark.parametrize("family,kwargs", [("glm45", {}), ("glm47", {})])
def test_a_new_user_turn_drops_the_reasoning_before_it(families, family, kwargs) -> None:
    """GLM-4.5/4.6, and GLM-4.7 by default, render earlier turns' reasoning only after the last user
    message: a new user turn re-renders the first assistant turn after the previous user message
    without it, so reuse ends around request 1's prompt: a few tokens into that turn on GLM-4.5
    ("\n<think>" survives), one token short of it on GLM-4.7 (its generation prompt's "<think>" is
    re-rendered as "</think>")."""
    template, tok = families[family]
    p = _prompts(template, tok, kwargs)
    lcp = next(i for i, (a, b) in enumerate(zip(p[2], p[3])) if a != b)
    assert len(p[0]) - 1 <= lcp < len(p[0]) + 4


def test_glm47_clear_thinking_false_keeps_the_history_stable_across_user_turns(families) -> None:
    template, tok = families["glm47"]
    p = _prompts(template, tok, {"clear_thinking": False})
    for i in range(1, len(p)):
        assert p[i][:len(p[i - 1])] == p[i - 1], f"request {i + 1} does not extend request {i}"


PARAMS = {"type": "object", "required": ["city"],
          "properties": {"days": {"type": "integer", "minimum": 1}, "city": {"type": "string"}}}


def _grpc_tools(params: dict) -> list[dict]:
    req = gateway_pb2.ChatRequest(tools=[gateway_pb2.Tool(type="function", function=gateway_pb2.FunctionDefinition(
        name="get_weather", description="Get the weather"))])
    req.tools[0].function.parameters.update(params)
    wire = gateway_pb2.ChatRequest.FromString(req.SerializeToString())  # what a server receives
    return chat_tools(wire, RequestLimits())[0]


def _reordered(v):
    if isinstance(v, dict):
        return {k: _reordered(v[k]) for k in reversed(list(v))}
    return v


@pytest.mark.parametrize("family", FAMILIES)
def test_grpc_tool_schemas_render_with_sorted_keys_whatever_the_insertion_order(families, family) -> None:
    template, _ = families[family]
    user = [{"role": "user", "content": "Weather?"}]
    a, b = _grpc_tools(PARAMS), _grpc_tools(_reordered(PARAMS))
    assert template.render(user, a) == template.render(user, b)
    shown = json.dumps(a[0]["function"]["parameters"], ensure_ascii=False)
    assert shown == json.dumps(PARAMS, sort_keys=True, ensure_ascii=False)
    assert shown in template.render(user, a)


@pytest.mark.parametrize("family", FAMILIES)
def test_http_tool_schemas_render_in_the_clients_key_order(families, family) -> None:
    template, _ = families[family]

    def rendered(params: dict) -> str:
        body = {"model": "m", "messages": [{"role": "user", "content": "Weather?"}],
                "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": params}}]}
        call = chat_request(json.loads(json.dumps(body)), Limits()).calls[0]
        return template.render(call.messages, call.tools)

    assert rendered(PARAMS) == rendered(PARAMS)  # the same bytes from the client: the same prompt
    assert json.dumps(PARAMS, ensure_ascii=False) in rendered(PARAMS)
    assert json.dumps(_reordered(PARAMS), ensure_ascii=False) in rendered(_reordered(PARAMS))


# Token reuse of each request after the first, with the tiny tokenizer (docs/openai_http.md, "Prefix
# caching"): (prompt-only %, + output %) rounded, per row of template_reuse.ROWS.
RECORDED = {
    "GLM-4.5/4.6": [(40, 71), (62, 82), (35, 35), (65, 82), (73, 73)],
    "GLM-4.7 default": [(40, 71), (62, 82), (35, 35), (65, 82), (73, 73)],
    "GLM-4.7 clear_thinking:false": [(40, 71), (62, 82), (80, 98), (77, 88), (87, 99)],
    "GLM-4.7 clear_thinking:false, reasoning dropped": [(56, 56), (69, 69), (90, 90), (78, 78), (93, 93)],
}


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_template_reuse_stays_at_its_measured_values(families, variant) -> None:
    template, tok = families[variant.template]
    got = [(round(100 * r.prompt_only / r.tokens), round(100 * r.with_output / r.tokens))
           for r in measure(template, tok.encode, variant)]
    assert got == RECORDED[variant.name]


def test_agent_script_shape_follows_its_steps(families) -> None:
    """The agent replay's longer scripts: each user turn has its tool calls, each followed by its result,
    then an answer; a request ends at every user message and tool result; with GLM-4.7 keeping its
    reasoning, every request's prompt extends the previous one."""
    msgs, ends = agent_turns(3, system_chars=300, result_chars=200, reasoning_chars=100, steps=(3, 0, 1))
    roles = [m["role"] for m in msgs]
    assert roles == ["system", "user", *["assistant", "tool"] * 3, "assistant", "user", "assistant", "user",
                     "assistant", "tool", "assistant", "user"]
    assert [roles[e] for e in ends] == ["user", "tool", "tool", "tool", "user", "user", "tool", "user"]
    assert [m["tool_calls"][0]["function"]["arguments"]["pattern"] for m in msgs if "tool_calls" in m] == \
        [f"def handler_{i}" for i in range(4)]
    template, tok = families["glm47"]
    prompts = [tok.encode(template.render(msgs[:e + 1], TOOLS, chat_template_kwargs={"clear_thinking": False}))
               for e in ends]
    assert all(b[:len(a)] == a and len(b) > len(a) for a, b in itertools.pairwise(prompts))
