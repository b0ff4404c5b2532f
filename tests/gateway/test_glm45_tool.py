"""glm45 tool-call parser: docs/parsers.md §6 cases, §7 defects fixed, typing, undeclared/unclosed rules."""

from __future__ import annotations

import json
import re

import pytest

from gateway.parsers import ContentDelta, ToolCallArgs, ToolCallParser, ToolCallStart

W = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "date": {"type": "string"}},
            },
        },
    }
]
W2 = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "count": {"type": "number"},
                    "filters": {"type": "object"},
                },
            },
        },
    }
]
NOOP = [{"type": "function", "function": {"name": "noop", "parameters": {}}}]
SEARCH = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
]
TYPED = [
    {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {
                    "s": {"type": "string"},
                    "n": {"type": "number"},
                    "i": {"type": "integer"},
                    "b": {"type": "boolean"},
                    "o": {"type": "object"},
                    "a": {"type": "array"},
                    "sn": {"type": ["string", "null"]},
                },
            },
        },
    }
]

T1 = (
    "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Beijing</arg_value>\n"
    "<arg_key>date</arg_key>\n<arg_value>2024-06-27</arg_value>\n</tool_call>"
)
T1B = T1.replace("Beijing", "Shanghai").replace("2024-06-27", "2024-06-28")


def stream(parser: ToolCallParser, chunks: list[str]) -> tuple[list[list], str, list[tuple[str, dict]]]:
    """Feed chunks; return per-feed events (finish last), content, and [(name, arguments)]."""
    per_feed = [parser.feed(c) for c in chunks] + [parser.finish()]
    events = [e for batch in per_feed for e in batch]
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [s.index for s in starts] == list(range(len(starts)))
    for s in starts:
        assert re.fullmatch(r"call_[0-9a-f]{24}", s.id)
    args = {s.index: "" for s in starts}
    for e in events:
        if isinstance(e, ToolCallArgs):
            args[e.index] += e.fragment
    return per_feed, content, [(s.name, json.loads(args[s.index])) for s in starts]


def one_shot(tools, text: str, name: str = "glm45") -> tuple[str, list[tuple[str, dict]]]:
    content, calls = ToolCallParser(name, tools).parse(text)
    return content, [(n, json.loads(a)) for n, a in calls]


def test_t1_single_call_exact_json_text():
    content, calls = ToolCallParser("glm45", W).parse(T1)
    assert content == ""
    assert calls == [("get_weather", '{"city": "Beijing", "date": "2024-06-27"}')]


def test_t2_two_calls():
    content, calls = ToolCallParser("glm45", W).parse(T1 + T1B)
    assert content == ""
    assert [c.arguments for c in calls] == [
        '{"city": "Beijing", "date": "2024-06-27"}',
        '{"city": "Shanghai", "date": "2024-06-28"}',
    ]


def test_t4_text_before_is_stripped_content():
    text = "Let me check. <tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Tokyo</arg_value>\n</tool_call>"
    assert one_shot(W, text) == ("Let me check.", [("get_weather", {"city": "Tokyo"})])


def test_t6_literal_backslash_n_separators():
    text = r"<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Tokyo</arg_value>\n</tool_call>"
    assert one_shot(W, text) == ("", [("get_weather", {"city": "Tokyo"})])


def test_t8_zero_argument_call():
    assert ToolCallParser("glm45", NOOP).parse("<tool_call>noop\n</tool_call>") == ("", [("noop", "{}")])
    # Without the newline the name still ends at </tool_call>.
    assert ToolCallParser("glm45", NOOP).parse("<tool_call>noop</tool_call>") == ("", [("noop", "{}")])


def test_t9_typed_values_keep_non_ascii():
    text = (
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n<arg_key>count"
        '</arg_key>\n<arg_value>42</arg_value>\n<arg_key>filters</arg_key>\n<arg_value>{"a": 1}'
        "</arg_value>\n</tool_call>"
    )
    _, calls = ToolCallParser("glm45", W2).parse(text)
    assert calls[0].arguments == '{"city": "北京", "count": 42, "filters": {"a": 1}}'


def test_t14_multiline_string_value():
    text = (
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>line1\nline2</arg_value>\n</tool_call>"
    )
    assert one_shot(W, text) == ("", [("get_weather", {"city": "line1\nline2"})])


S1 = [
    "<tool_call>get_weather\n",
    "<arg_key>city</arg_key>\n<arg_value>Beijing</arg_value>\n",
    "<arg_key>date</arg_key>\n<arg_value>2024-06-27</arg_value>\n",
    "</tool_call>",
]


def test_s1_default_mode_emits_call_at_close():
    per_feed, content, calls = stream(ToolCallParser("glm45", W), S1)
    assert per_feed[:3] == [[], [], []]
    assert [type(e) for e in per_feed[3]] == [ToolCallStart, ToolCallArgs]
    assert per_feed[3][1].fragment == '{"city": "Beijing", "date": "2024-06-27"}'
    assert (content, calls) == ("", [("get_weather", {"city": "Beijing", "date": "2024-06-27"})])


def test_s1_stream_arguments_mode_matches_sglang_fragments():
    per_feed, _, calls = stream(ToolCallParser("glm45", W, stream_arguments=True), S1)
    assert isinstance(per_feed[0][0], ToolCallStart) and per_feed[0][0].name == "get_weather"
    assert [e.fragment for e in per_feed[1]] == ['{"city": "Beijing"']
    assert [e.fragment for e in per_feed[2]] == [', "date": "2024-06-27"']
    assert [e.fragment for e in per_feed[3]] == ["}"]
    assert calls == [("get_weather", {"city": "Beijing", "date": "2024-06-27"})]


@pytest.mark.parametrize("stream_arguments", [False, True])
def test_s6_text_sharing_a_chunk_with_the_call_is_kept(stream_arguments):
    chunks = [
        "Let me ",
        "check. <tool",
        "_call>get_weather\n<arg_key>ci",
        "ty</arg_key>\n<arg_value>To",
        "kyo</arg_value>\n</tool_call>",
    ]
    _, content, calls = stream(ToolCallParser("glm45", W, stream_arguments=stream_arguments), chunks)
    assert content == "Let me check."  # SGLang 0.5.23 loses "check. "
    assert calls == [("get_weather", {"city": "Tokyo"})]


@pytest.mark.parametrize("stream_arguments", [False, True])
def test_s8_typed_values_stream_with_json_types(stream_arguments):
    chunks = [
        "<tool_call>get_weather\n<arg_key>count</arg_key>\n<arg_value>4",
        '2</arg_value>\n<arg_key>filters</arg_key>\n<arg_value>{"a":',
        " 1}</arg_value>\n</tool_call>",
    ]
    _, _, calls = stream(ToolCallParser("glm45", W2, stream_arguments=stream_arguments), chunks)
    assert calls == [("get_weather", {"count": 42, "filters": {"a": 1}})]


@pytest.mark.parametrize("stream_arguments", [False, True])
def test_s12_all_calls_of_one_chunk_and_trailing_text_are_emitted(stream_arguments):
    parser = ToolCallParser("glm45", W, stream_arguments=stream_arguments)
    events = parser.feed("Hi " + T1 + "\n" + T1B + " Done.")
    assert [e.name for e in events if isinstance(e, ToolCallStart)] == ["get_weather", "get_weather"]
    rest = parser.finish()
    text = "".join(e.text for e in events + rest if isinstance(e, ContentDelta))
    assert text.strip() == "Hi \n Done.".strip()
    assert text == "Hi \n Done."


def test_finish_drains_held_partial_tag_as_content():
    parser = ToolCallParser("glm45", W)
    assert parser.feed("answer <tool_ca") == [ContentDelta("answer")]
    assert parser.finish() == [ContentDelta(" <tool_ca")]


@pytest.mark.parametrize("stream_arguments", [False, True])
def test_issue_33902_undeclared_tool_is_content_in_streaming(stream_arguments):
    text = "hi <tool_call>bogus\n<arg_key>q</arg_key>\n<arg_value>x</arg_value>\n</tool_call> there"
    _per_feed, content, calls = stream(
        ToolCallParser("glm45", W, stream_arguments=stream_arguments), list(text)
    )
    assert calls == []
    assert content == text
    assert ToolCallParser("glm45", W).parse(text) == (text, [])


def test_undeclared_name_is_passed_on_before_the_call_closes():
    parser = ToolCallParser("glm45", W)
    out = parser.feed("<tool_call>bogus_tool")  # cannot become get_weather any more
    assert out == [ContentDelta("<tool_call>bogus_tool")]


def test_declared_name_prefix_is_held_then_released_as_content_when_undeclared():
    parser = ToolCallParser("glm45", W)
    assert parser.feed("<tool_call>get_weathe") == []
    out = parser.feed("\n<arg_key>city</arg_key>")
    assert out == [ContentDelta("<tool_call>get_weathe\n<arg_key>city</arg_key>")]


def test_unclosed_call_is_content_in_both_modes():
    text = "Checking. <tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Par"
    assert ToolCallParser("glm45", W).parse(text) == (text, [])
    _, content, calls = stream(ToolCallParser("glm45", W), list(text))
    assert (content, calls) == (text, [])


def test_unclosed_call_with_stream_arguments_is_closed_with_what_was_seen():
    text = "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Par"
    _, content, calls = stream(ToolCallParser("glm45", W, stream_arguments=True), [text[:30], text[30:]])
    assert (content, calls) == ("", [("get_weather", {"city": "Par"})])


def test_partial_name_is_never_announced_in_stream_arguments_mode():
    parser = ToolCallParser("glm45", W, stream_arguments=True)
    assert parser.feed("<tool_call>get_weather") == []  # a longer name could still follow
    started = parser.feed("\n")
    assert [type(e) for e in started] == [ToolCallStart]
    assert parser.finish() == [ToolCallArgs(0, "{}")]


@pytest.mark.parametrize(
    "raw", ["123_456", "007", "true", "null", "1.5", '"quoted"', "{'k': 1}", "[1, 2]", " padded "]
)
def test_declared_strings_are_never_coerced(raw):
    # T17 (0.5.23 gives "True"/"None") and #30644 (123_456 -> 123456) required fixed.
    text = f"<tool_call>f\n<arg_key>s</arg_key>\n<arg_value>{raw}</arg_value>\n</tool_call>"
    assert one_shot(TYPED, text) == ("", [("f", {"s": raw})])
    _, _, calls = stream(ToolCallParser("glm45", TYPED, stream_arguments=True), list(text))
    assert calls == [("f", {"s": raw})]


@pytest.mark.parametrize(
    "key,raw,value",
    [
        ("n", "42", 42),
        ("n", "-1.5e3", -1500.0),
        ("n", '"42"', 42),
        ("n", "123abc", "123abc"),
        ("n", "", ""),
        ("n", "NaN", "NaN"),
        ("n", "1e999", "1e999"),
        ("i", "7", 7),
        ("b", "true", True),
        ("b", "True", "True"),
        ("o", '{"k": [1, "二"]}', {"k": [1, "二"]}),
        ("a", r"[{\"id\": \"1\"}]", [{"id": "1"}]),
        ("sn", "null", None),
        ("sn", "true", "true"),
        ("sn", "x", "x"),
    ],
)
def test_declared_non_strings_decode_from_json(key, raw, value):
    text = f"<tool_call>f\n<arg_key>{key}</arg_key>\n<arg_value>{raw}</arg_value>\n</tool_call>"
    assert one_shot(TYPED, text) == ("", [("f", {key: value})])


@pytest.mark.parametrize(
    "raw,value",
    [
        ("7", 7),
        ("true", True),
        ('{"k": 1}', {"k": 1}),
        ('"q"', "q"),
        ("True", "True"),
        ("123_456", "123_456"),
        ("{'k': 1}", "{'k': 1}"),
        ("abc", "abc"),
    ],
)
def test_issue_35564_undeclared_values_keep_json_types_when_streamed(raw, value):
    text = f"<tool_call>f\n<arg_key>extra</arg_key>\n<arg_value>{raw}</arg_value>\n</tool_call>"
    assert one_shot(TYPED, text) == ("", [("f", {"extra": value})])
    _, _, calls = stream(ToolCallParser("glm45", TYPED, stream_arguments=True), list(text))
    assert calls == [("f", {"extra": value})]


def test_streamed_string_fragments_are_json_escaped_per_character():
    parser = ToolCallParser("glm45", TYPED, stream_arguments=True)
    events = parser.feed("<tool_call>f\n<arg_key>s</arg_key>\n<arg_value>")
    events += parser.feed('a"\\\n😀')
    assert ToolCallArgs(0, 'a\\"\\\\\\n😀') in events
    events += parser.feed("</arg_value>\n</tool_call>") + parser.finish()
    body = "".join(e.fragment for e in events if isinstance(e, ToolCallArgs))
    assert body == json.dumps({"s": 'a"\\\n😀'}, ensure_ascii=False)


def test_non_string_value_is_held_until_value_end():
    parser = ToolCallParser("glm45", TYPED, stream_arguments=True)
    parser.feed("<tool_call>f\n<arg_key>n</arg_key>\n<arg_value>4")
    assert parser.feed("2") == []
    assert parser.feed("</arg_value>") == [ToolCallArgs(0, '{"n": 42')]


def test_indices_count_only_real_calls_and_ids_differ():
    text = T1 + "<tool_call>bogus\n</tool_call>" + T1B
    per_feed, content, _calls = stream(ToolCallParser("glm45", W), [text])
    starts = [e for e in per_feed[0] if isinstance(e, ToolCallStart)]
    assert [s.index for s in starts] == [0, 1] and starts[0].id != starts[1].id
    assert content == "<tool_call>bogus\n</tool_call>"


def test_name_after_leading_whitespace_and_key_without_value():
    text = "<tool_call>\n get_weather \n<arg_key>date</arg_key>\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value></tool_call>"
    assert one_shot(W, text) == ("", [("get_weather", {"city": "Oslo"})])


def test_value_may_contain_other_tags_but_ends_at_call_end():
    text = "<tool_call>search\n<arg_key>query</arg_key>\n<arg_value>a <arg_key>b</arg_value>\n</tool_call>"
    assert one_shot(SEARCH, text) == ("", [("search", {"query": "a <arg_key>b"})])
    cut = "<tool_call>search\n<arg_key>query</arg_key>\n<arg_value>a</tool_call>tail"
    assert one_shot(SEARCH, cut) == ("tail", [("search", {"query": "a"})])


def test_no_tools_means_every_call_is_content():
    text = "x <tool_call>get_weather\n</tool_call>"
    assert ToolCallParser("glm45", []).parse(text) == (text, [])


def test_unknown_parser_name_lists_valid_names():
    with pytest.raises(ValueError, match="glm45.*glm47"):
        ToolCallParser("hermes", W)


def test_tool_without_name_is_rejected():
    with pytest.raises(ValueError, match=r"tools\[0\]"):
        ToolCallParser("glm45", [{"type": "function", "function": {"parameters": {}}}])


def test_feed_after_finish_is_an_error():
    parser = ToolCallParser("glm45", W)
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")
