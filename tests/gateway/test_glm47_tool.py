"""glm47 tool-call parser: docs/parsers.md §6 cases, §3.3 schema typing, draining, undeclared/unclosed."""

from __future__ import annotations

import json

import pytest

from gateway.parsers import ContentDelta, ToolCallArgs, ToolCallParser, ToolCallStart


def tool(name: str, properties: dict | None = None, **extra) -> dict:
    parameters = {"type": "object", "properties": properties or {}, **extra}
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


W = [tool("get_weather", {"city": {"type": "string"}, "date": {"type": "string"}})]
TASK = [tool("create_task", {"title": {"type": "string"}, "location": {"type": "string"}})]
TODOS = [
    tool(
        "create_todos",
        {"priority": {"type": "number"}, "count": {"type": "integer"}, "items": {"type": "array"}},
    )
]


def stream(parser: ToolCallParser, chunks: list[str]) -> tuple[list[list], str, list[tuple[str, dict]]]:
    per_feed = [parser.feed(c) for c in chunks] + [parser.finish()]
    events = [e for batch in per_feed for e in batch]
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [s.index for s in starts] == list(range(len(starts)))
    args = {s.index: "" for s in starts}
    for e in events:
        if isinstance(e, ToolCallArgs):
            args[e.index] += e.fragment
    return per_feed, content, [(s.name, json.loads(args[s.index])) for s in starts]


def fragments(events: list) -> list[str]:
    return [e.fragment for e in events if isinstance(e, ToolCallArgs)]


def test_u1_single_call():
    text = (
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Beijing</arg_value><arg_key>date"
        "</arg_key><arg_value>2024-06-27</arg_value></tool_call>"
    )
    assert ToolCallParser("glm47", W).parse(text) == (
        "",
        [("get_weather", '{"city": "Beijing", "date": "2024-06-27"}')],
    )


def test_u2_zero_argument_call():
    tools = [tool("list_filenames")]
    assert ToolCallParser("glm47", tools).parse("<tool_call>list_filenames</tool_call>") == (
        "",
        [("list_filenames", "{}")],
    )


def test_u3_text_before_and_after_is_content():
    tools = [tool("action")]
    text = "First I'll do this.<tool_call>action</tool_call>Then I'll do that."
    assert ToolCallParser("glm47", tools).parse(text) == (
        "First I'll do this.Then I'll do that.",
        [("action", "{}")],
    )


U10 = [
    "I'll create a task.",
    "<tool_call>create_ta",
    "sk<arg_key>title</arg_key><arg_value>Go to Bei",
    "jing</arg_value>",
    "<arg_key>location</arg_key><arg_value>San Fran",
    "cisco</arg_value></tool_call>",
]


def test_u10_stream_arguments_fragments():
    per_feed, _content, calls = stream(ToolCallParser("glm47", TASK, stream_arguments=True), U10)
    assert per_feed[0] == [ContentDelta("I'll create a task.")]
    assert per_feed[1] == []
    assert isinstance(per_feed[2][0], ToolCallStart) and per_feed[2][0].name == "create_task"
    assert fragments(per_feed[2]) == ['{"title": "Go to Bei']
    assert fragments(per_feed[3]) == ['jing"']
    assert fragments(per_feed[4]) == [', "location": "San Fran']
    assert fragments(per_feed[5]) == ['cisco"}']
    assert calls == [("create_task", {"title": "Go to Beijing", "location": "San Francisco"})]


def test_u10_default_mode_same_result_emitted_at_close():
    per_feed, content, calls = stream(ToolCallParser("glm47", TASK), U10)
    assert all(not any(isinstance(e, ToolCallStart) for e in batch) for batch in per_feed[:5])
    assert content == "I'll create a task."
    assert calls == [("create_task", {"title": "Go to Beijing", "location": "San Francisco"})]


def test_u12_typed_values_stream_as_json():
    chunks = [
        "<tool_call>create_todos",
        "<arg_key>priority</arg_key><arg_value>5.5</arg_value>",
        "<arg_key>count</arg_key><arg_value>10</arg_value>",
        '<arg_key>items</arg_key><arg_value>[{"description',
        '": "Test',
        'Todo 1"}, {"description": "TestTodo 2"}]</arg_value></tool_call>',
    ]
    per_feed, _, calls = stream(ToolCallParser("glm47", TODOS, stream_arguments=True), chunks)
    assert fragments(per_feed[1]) == ['{"priority": 5.5']
    assert fragments(per_feed[2]) == [', "count": 10']
    assert fragments(per_feed[3]) == [] and fragments(per_feed[4]) == []  # array held until </arg_value>
    expected = {
        "priority": 5.5,
        "count": 10,
        "items": [{"description": "TestTodo 1"}, {"description": "TestTodo 2"}],
    }
    assert calls == [("create_todos", expected)]


@pytest.mark.parametrize("stream_arguments", [False, True])
def test_several_calls_and_text_in_one_chunk_are_all_emitted(stream_arguments):
    tools = [tool("a", {"x": {"type": "integer"}}), tool("b")]
    text = (
        "Before: <tool_call>a<arg_key>x</arg_key><arg_value>1</arg_value></tool_call> Between: "
        "<tool_call>b</tool_call> After."
    )
    parser = ToolCallParser("glm47", tools, stream_arguments=stream_arguments)
    events = parser.feed(text)
    assert [e.name for e in events if isinstance(e, ToolCallStart)] == ["a", "b"]
    _, content, calls = stream(ToolCallParser("glm47", tools, stream_arguments=stream_arguments), [text])
    assert content == "Before:  Between:  After."
    assert calls == [("a", {"x": 1}), ("b", {})]
    assert ToolCallParser("glm47", tools).parse(text)[0] == "Before:  Between:  After."


@pytest.mark.parametrize(
    "schema,raw,value",
    [
        ({"type": ["integer", "string"]}, "auto", "auto"),
        ({"type": ["string", "integer"]}, "7", 7),
        ({"enum": ["7", 8]}, "7", "7"),
        ({"enum": ["7", 8]}, "8", 8),
        ({"type": "string"}, "1e2", "1e2"),
        ({"const": "null"}, "null", "null"),
        ({}, "123_456", "123_456"),
        ({"type": "integer"}, "1.25e2", 125.0),
        ({"type": "integer"}, '"12"', 12),
        ({"type": "integer"}, '"1.5"', "1.5"),
        ({"type": "number"}, "123abc", "123abc"),
        ({"type": "number"}, '"123"', 123),
        ({"type": "number"}, r"\"123\"", 123),
        ({"type": ["string", "null"]}, "null", None),
        ({"anyOf": [{"type": "string"}, {"type": "null"}]}, "null", None),
        ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, "false", False),
        ({"type": "string", "nullable": True}, "null", None),
        ({"allOf": [{"type": "number"}, {"type": "integer"}]}, "3", 3),
        ({"properties": {"k": {}}}, '{"k": 1}', {"k": 1}),
        ({"items": {}}, "[1]", [1]),
        ({"$ref": "#/$defs/a~1b"}, "5", 5),
        ({"$ref": "#/$defs/loop"}, "true", True),  # a reference cycle admits anything
    ],
)
def test_schema_typing(schema, raw, value):
    defs = {"a/b": {"type": "integer"}, "loop": {"$ref": "#/$defs/loop"}}
    tools = [tool("f", {"v": schema}, **{"$defs": defs})]
    text = f"<tool_call>f<arg_key>v</arg_key><arg_value>{raw}</arg_value></tool_call>"
    content, calls = ToolCallParser("glm47", tools).parse(text)
    assert content == "" and json.loads(calls[0].arguments) == {"v": value}
    assert type(json.loads(calls[0].arguments)["v"]) is type(value)


def test_properties_merged_from_root_combinators():
    tools = [
        tool(
            "f",
            None,
            anyOf=[
                {"properties": {"n": {"type": "integer"}}},
                {"properties": {"n": {"type": "string"}, "m": {"type": "number"}}},
            ],
        )
    ]
    text = (
        "<tool_call>f<arg_key>n</arg_key><arg_value>5</arg_value><arg_key>m</arg_key>"
        "<arg_value>2</arg_value></tool_call>"
    )
    assert json.loads(ToolCallParser("glm47", tools).parse(text)[1][0].arguments) == {"n": 5, "m": 2}


def test_glm45_newline_after_name_is_accepted_but_literal_backslash_n_is_not():
    ok = "<tool_call>get_weather\n<arg_key>city</arg_key><arg_value>Rome</arg_value></tool_call>"
    assert ToolCallParser("glm47", W).parse(ok)[1] == [("get_weather", '{"city": "Rome"}')]
    literal = r"<tool_call>get_weather\n<arg_key>city</arg_key><arg_value>Rome</arg_value></tool_call>"
    assert ToolCallParser("glm47", W).parse(literal) == (literal, [])


@pytest.mark.parametrize("stream_arguments", [False, True])
def test_undeclared_tool_is_content_in_streaming(stream_arguments):
    text = "hi <tool_call>bogus<arg_key>q</arg_key><arg_value>1</arg_value></tool_call> there"
    _, content, calls = stream(ToolCallParser("glm47", W, stream_arguments=stream_arguments), list(text))
    assert (content, calls) == (text, [])
    assert ToolCallParser("glm47", W).parse(text) == (text, [])


def test_unclosed_call_is_content_and_not_announced():
    text = "ok <tool_call>get_weather<arg_key>city</arg_key><arg_value>Lima</arg_value>"
    parser = ToolCallParser("glm47", W)
    events = [e for ch in text for e in parser.feed(ch)] + parser.finish()
    assert not any(isinstance(e, (ToolCallStart, ToolCallArgs)) for e in events)
    assert "".join(e.text for e in events) == text
    assert ToolCallParser("glm47", W).parse(text) == (text, [])


def test_unclosed_name_at_end_is_content_even_with_stream_arguments():
    text = "<tool_call>get_weather"
    _, content, calls = stream(ToolCallParser("glm47", W, stream_arguments=True), list(text))
    assert (content, calls) == (text, [])
