"""The tool-call grammar (gateway/tool_grammar.py) against the grammar backend and the parsers:
every generated EBNF compiles with xgrammar; the parsers' own texts are accepted; wrong-typed,
missing or undeclared arguments are rejected; and texts drawn at random from the grammar parse back
(glm45 / glm47 parsers) into arguments that validate against each tool's schema (jsonschema).

xgrammar (and the torch it imports) is a test-only import here: the gateway never compiles grammars."""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema
import pytest
import xgrammar as xgr

from gateway.parsers.glm45_tool import Glm45ToolParser
from gateway.parsers.glm47_tool import Glm47ToolParser
from gateway.tool_grammar import ToolGrammarError, tool_call_grammar, tool_call_structural_tag

PARSERS = {"glm45": Glm45ToolParser, "glm47": Glm47ToolParser}
SEP = {"glm45": "\n", "glm47": ""}

WEATHER = {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12, "description": "a city"},
        "days": {"type": "integer"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "hourly": {"type": "boolean"},
        "note": {"type": ["string", "null"]},
    },
    "required": ["city", "days"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "strict": True, "parameters": {
    "type": "object",
    "properties": {
        "query": {"type": "string"},
        "filters": {"type": "object", "properties": {
            "lang": {"enum": ["en", "fr", 3]},
            "after": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            "score": {"type": "number"}},
            "required": ["lang"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3},
        "mode": {"const": "fast"},
    },
    "required": ["query", "filters"]}}}
NOARGS = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, SEARCH, NOARGS]

# A character vocabulary plus the markup as whole tokens (as GLM's tokenizer has them).
MARKUP = ["<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"]
VOCAB = [chr(c) for c in range(32, 127)] + ["\n", "é", *MARKUP, "<eos>"]
EOS = len(VOCAB) - 1


@pytest.fixture(scope="module")
def compiler():
    return xgr.GrammarCompiler(xgr.TokenizerInfo(VOCAB, stop_token_ids=[EOS]))


def _matcher(compiler, ebnf: str):
    return xgr.GrammarMatcher(compiler.compile_grammar(ebnf))


def accepts(compiler, ebnf: str, text: str) -> bool:
    m = _matcher(compiler, ebnf)
    return m.accept_string(text) and m.is_completed()


def call(family: str, name: str, *args: tuple[str, str]) -> str:
    s = SEP[family]
    return (f"<tool_call>{name}{s}" + "".join(f"<arg_key>{k}</arg_key>{s}<arg_value>{v}</arg_value>{s}"
                                               for k, v in args) + "</tool_call>")


@pytest.mark.parametrize("family", ["glm45", "glm47"])
def test_valid_calls_are_accepted_and_parse_back_schema_valid(compiler, family):
    ebnf = tool_call_grammar(TOOLS, family, single=False)
    texts = [
        call(family, "get_weather", ("city", "Paris"), ("days", "3")),
        call(family, "get_weather", ("city", "Étretat"), ("days", "-2"), ("unit", "celsius"),
             ("hourly", "false"), ("note", "null")),
        call(family, "search", ("query", 'say "hi" {now}'), ("filters", '{"lang": 3, "after": null, "score": 1.5e3}'),
             ("tags", '["a","b\\u003c"]'), ("mode", "fast")),
        call(family, "now"),
        "\n" + call(family, "now") + "\n" + call(family, "get_weather", ("city", "Rome"), ("days", "0")),
    ]
    for text in texts:
        assert accepts(compiler, ebnf, text), text
        _, calls = PARSERS[family](TOOLS).parse(text)
        assert calls, text
        _validate(calls)


@pytest.mark.parametrize("family", ["glm45", "glm47"])
def test_wrong_types_missing_and_undeclared_arguments_are_rejected(compiler, family):
    ebnf = tool_call_grammar(TOOLS, family, single=False)
    for text in [
        call(family, "get_weather", ("city", "Paris"), ("days", "3.5")),           # integer
        call(family, "get_weather", ("city", "Paris"), ("days", '"3"')),           # integer, not a string
        call(family, "get_weather", ("city", "Paris")),                            # days is required
        call(family, "get_weather", ("city", "x" * 13), ("days", "1")),            # maxLength
        call(family, "get_weather", ("city", "a<b"), ("days", "1")),               # raw strings hold no "<"
        call(family, "get_weather", ("city", "P"), ("days", "1"), ("unit", "kelvin")),  # enum
        call(family, "get_weather", ("city", "P"), ("days", "1"), ("hourly", "yes")),   # boolean
        call(family, "get_weather", ("city", "P"), ("days", "1"), ("wind", "3")),       # undeclared
        call(family, "search", ("query", "q"), ("filters", '{"lang": "de"}')),           # nested enum
        call(family, "search", ("query", "q"), ("filters", '{"after": 1}')),             # nested required
        call(family, "search", ("query", "q"), ("filters", '{"lang": "en", "x": 1}')),   # additionalProperties
        call(family, "search", ("query", "q"), ("filters", '{"lang": "en"}'), ("tags", "[]")),  # minItems
        call(family, "search", ("query", "q"), ("filters", '{"lang": "en"}'), ("tags", '["a","b","c","d"]')),
        call(family, "search", ("query", "q"), ("filters", '{"lang": "en"}'), ("mode", "slow")),  # const
        call(family, "delete_all"),                                                # undeclared tool
        "I'd rather answer in prose.",
    ]:
        assert not accepts(compiler, ebnf, text), text


def test_named_choice_allows_exactly_one_call_of_that_tool(compiler):
    ebnf = tool_call_grammar([WEATHER], "glm45", single=True)
    one = call("glm45", "get_weather", ("city", "Oslo"), ("days", "1"))
    assert accepts(compiler, ebnf, one) and accepts(compiler, ebnf, "\n" + one)
    assert not accepts(compiler, ebnf, one + "\n" + one)
    assert not accepts(compiler, ebnf, call("glm45", "now"))


def test_the_parsers_documented_examples_are_accepted(compiler):
    """docs/parsers.md's glm45 / glm47 examples (string arguments), under an all-string schema."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "date": {"type": "string"}}}}}]
    glm45 = ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Beijing</arg_value>\n"
             "<arg_key>date</arg_key>\n<arg_value>2024-06-27</arg_value>\n</tool_call>")
    glm47 = ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Beijing</arg_value><arg_key>date"
             "</arg_key><arg_value>2024-06-27</arg_value></tool_call>")
    assert accepts(compiler, tool_call_grammar(tools, "glm45", single=True), glm45)
    assert accepts(compiler, tool_call_grammar(tools, "glm47", single=True), glm47)
    assert not accepts(compiler, tool_call_grammar(tools, "glm47", single=True), glm45)  # layouts differ


@pytest.mark.parametrize("family", ["glm45", "glm47"])
def test_random_texts_of_the_grammar_parse_back_into_schema_valid_calls(compiler, family):
    """A random walk over the grammar's allowed tokens (the worker's mask, without a model): every
    finished text is read back by the family's parser into calls whose arguments validate."""
    ebnf = tool_call_grammar(TOOLS, family, single=False)
    compiled = compiler.compile_grammar(ebnf)
    rng = random.Random(7)
    bitmask = xgr.allocate_token_bitmask(1, len(VOCAB))
    finished = 0
    names: set[str] = set()
    for _ in range(150):
        ids = _walk(compiled, bitmask, rng, 400)
        if ids is None:
            continue
        finished += 1
        text = "".join(VOCAB[i] for i in ids[:-1])
        content, calls = PARSERS[family](TOOLS).parse(text)
        assert calls and content == "", text
        _validate(calls)
        names |= {c.name for c in calls}
    assert finished >= 75 and names == {"get_weather", "search", "now"}


def _validate(calls) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for c in calls:
        jsonschema.validate(json.loads(c.arguments), schemas[c.name])


@pytest.mark.parametrize("schema, path", [
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}, ".properties.n.minimum"),
    ({"type": "object", "properties": {"s": {"type": "string", "pattern": "^a"}}}, ".properties.s.pattern"),
    ({"type": "object", "properties": {"r": {"$ref": "#/$defs/x"}}, "$defs": {"x": {}}}, ".$defs"),
    ({"type": "object", "properties": {"o": {"oneOf": [{"type": "integer"}]}}}, ".properties.o.oneOf"),
    ({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "number", "maximum": 2}}}},
     ".properties.a.items.maximum"),
    ({"type": "object", "properties": {"m": {"type": ["string", "object"]}}}, ".properties.m"),
    ({"type": "object", "properties": {"m": {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}]}}},
     ".properties.m"),
    ({"type": "object", "properties": {"m": {"anyOf": [{"enum": ["a"]}, {"type": "integer"}]}}}, ".properties.m"),
    ({"type": "object", "properties": {}, "required": ["ghost"]}, ".required"),
    ({"type": "object", "properties": {"t": {"type": "string", "minLength": 5, "maxLength": 2}}},
     ".properties.t.minLength"),
])
def test_strict_tools_outside_the_subset_are_refused_naming_the_keyword(schema, path):
    tool = {"type": "function", "function": {"name": "f", "strict": True, "parameters": schema}}
    with pytest.raises(ToolGrammarError) as e:
        tool_call_grammar([NOARGS, tool], "glm45", single=False)
    assert e.value.path == path and e.value.index == 1


def test_non_strict_tools_keep_their_types_and_leave_other_keywords_unenforced(compiler):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "n": {"type": "integer", "minimum": 10}, "r": {"$ref": "#/$defs/x"}, "s": {"type": "string", "pattern": "^a"}},
        "required": ["n"], "$defs": {"x": {"type": "integer"}}}}}
    ebnf = tool_call_grammar([tool], "glm45", single=True)
    assert accepts(compiler, ebnf, call("glm45", "f", ("n", "3"), ("r", "17"), ("s", "bcd")))
    assert not accepts(compiler, ebnf, call("glm45", "f", ("n", "three")))  # the type still holds
    odd = {"type": "function", "function": {"name": "g", "parameters": {"type": "object", "properties": {
        "a": False, "b": {"type": "decimal"}, "c": {"type": "array", "maxItems": "2"},
        "d": {"type": "object", "properties": {"x": {"type": "decimal"}, "y": False}}}, "required": ["ghost"]}}}
    ebnf = tool_call_grammar([odd], "glm47", single=True)  # best effort, never a refusal without strict
    assert accepts(compiler, ebnf, call("glm47", "g", ("a", "1"), ("b", '"x"'), ("c", "[1,2,3]"),
                                           ("d", '{"x": [true], "y": 0}')))


@pytest.mark.parametrize("family", ["glm45", "glm47"])
def test_auto_choice_structural_tag_frees_the_text_and_holds_each_call(compiler, family):
    """tool_choice auto with a strict tool: text is free, and any call the model opens is held to its
    tool's schema (the non-strict tool's call stays possible, with its types)."""
    tools = [WEATHER, NOARGS, {"type": "function", "function": {"name": "get", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}]
    tag = json.loads(tool_call_structural_tag(tools, family))
    assert [t["begin"] for t in tag["format"]["tags"]] == [f"<tool_call>{n}{SEP[family]}"
                                                          for n in ("get_weather", "now", "get")]
    m_compiled = compiler.compile_grammar(xgr.Grammar.from_structural_tag(json.dumps(tag)))

    def ok(text: str) -> bool:
        m = xgr.GrammarMatcher(m_compiled)
        return m.accept_string(text) and m.is_completed()

    weather = call(family, "get_weather", ("city", "Oslo"), ("days", "2"))
    assert ok("No tool needed, it is sunny.")
    assert ok("Let me check.\n" + weather + "\nDone " + call(family, "get", ("n", "7")))
    assert ok(call(family, "now"))
    assert not ok(call(family, "get_weather", ("city", "Oslo"), ("days", "two")))
    assert not ok(call(family, "get", ("n", "x")))
    assert not ok(call(family, "delete_all"))
    _, calls = PARSERS[family](tools).parse("Let me check.\n" + weather)
    assert [c.name for c in calls] == ["get_weather"] and json.loads(calls[0].arguments) == {"city": "Oslo", "days": 2}


def test_structural_tag_refuses_a_strict_tool_outside_the_subset():
    tool = {"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}}}
    with pytest.raises(ToolGrammarError) as e:
        tool_call_structural_tag([NOARGS, tool], "glm45")
    assert (e.value.index, e.value.path) == (1, ".properties.n.minimum")


def _random_schema(rng: random.Random, depth: int) -> dict:
    """A schema from the enforced subset (strings never hold "<": the grammar's raw text cannot)."""
    kinds = ["string", "integer", "number", "boolean", "null", "enum", "const", "anyOf"]
    if depth > 0:
        kinds += ["array", "object", "object"]
    kind = rng.choice(kinds)
    if kind == "string":
        node: dict = {"type": "string"}
        if rng.random() < 0.6:
            low = rng.randrange(3)
            node.update(minLength=low, maxLength=low + rng.randrange(6))
        return node
    if kind in ("integer", "number", "boolean", "null"):
        return {"type": rng.choice([kind, [kind, "null"]])} if kind != "null" else {"type": "null"}
    if kind == "enum":
        return {"enum": rng.sample(["a", "b c", 1, 2.5, True, None, 'x"y'], rng.randrange(1, 4))}
    if kind == "const":
        return {"const": rng.choice(["k", 7, False, None, [1, "a"], {"z": 1}])}
    if kind == "anyOf":
        return {"anyOf": [_random_schema(rng, 0) for _ in range(rng.randrange(1, 3))]}
    if kind == "array":
        node = {"type": "array", "items": _random_schema(rng, depth - 1)}
        if rng.random() < 0.7:
            low = rng.randrange(2)
            node.update(minItems=low, maxItems=low + rng.randrange(3))
        return node
    props = {f"p{i}": _random_schema(rng, depth - 1) for i in range(rng.randrange(4))}
    node = {"type": "object", "properties": props,
            "required": [k for k in props if rng.random() < 0.5]}
    if rng.random() < 0.5:
        node["additionalProperties"] = False
    return node


@pytest.mark.parametrize("family", ["glm45", "glm47"])
def test_random_strict_schemas_round_trip_through_grammar_and_parser(compiler, family):
    """Property: for random strict tools from the subset, every text the grammar allows (random walks)
    parses back into arguments that validate against the tool's schema; the builder refuses only the
    documented case (an argument mixing strings with other types beyond unconstrained scalars)."""
    rng = random.Random(11 if family == "glm45" else 12)
    bitmask = xgr.allocate_token_bitmask(1, len(VOCAB))
    built = walked = 0
    for t in range(40):
        params = _random_schema(rng, 2)
        params = {"type": "object", "properties": params.get("properties") or {"v": params},
                  "required": params.get("required", ["v"])}
        tool = {"type": "function", "function": {"name": f"t{t}", "strict": True, "parameters": params}}
        try:
            ebnf = tool_call_grammar([tool], family, single=True)
        except ToolGrammarError as e:
            assert e.problem.startswith("mixes string with other types"), (e, params)
            continue
        built += 1
        compiled = compiler.compile_grammar(ebnf)
        for _ in range(6):
            ids = _walk(compiled, bitmask, rng, 300)
            if ids is None:
                continue
            walked += 1
            text = "".join(VOCAB[i] for i in ids[:-1])
            content, calls = PARSERS[family]([tool]).parse(text)
            assert len(calls) == 1 and content == "", text
            jsonschema.validate(json.loads(calls[0].arguments), params)
    assert built >= 25 and walked >= 100


def _walk(compiled: xgr.CompiledGrammar, bitmask: Any, rng: random.Random, limit: int) -> list[int] | None:
    """A random walk over the tokens the grammar allows (longer tokens and the end preferred), up to
    the end token; None when it did not end within `limit` tokens."""
    m = xgr.GrammarMatcher(compiled)
    ids: list[int] = []
    while not m.is_terminated() and len(ids) < limit:
        m.fill_next_token_bitmask(bitmask)
        words = bitmask[0].tolist()
        allowed = [i for i in range(len(VOCAB)) if (words[i // 32] >> (i % 32)) & 1]
        weights = [40 if i == EOS else 20 if len(VOCAB[i]) > 1 else 1 for i in allowed]
        token = rng.choices(allowed, weights)[0]
        assert m.accept_token(token)
        ids.append(token)
    return ids if m.is_terminated() else None
