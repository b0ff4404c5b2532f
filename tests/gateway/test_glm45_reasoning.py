"""glm45 reasoning parser (docs/parsers.md §4, cases §6), the reasoning → tool-call chain, get_parsers."""

from __future__ import annotations

import json

import pytest

from gateway.parsers import (
    ContentDelta,
    ReasoningDelta,
    ReasoningParser,
    StreamingChatParser,
    ToolCallArgs,
    ToolCallParser,
    ToolCallStart,
    get_parsers,
)

W = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def feeds(parser: ReasoningParser, chunks: list[str]) -> list[tuple[str, str]]:
    return [parser.feed(c) for c in chunks] + [parser.finish()]


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize(
    "text,expected",
    [
        (
            "<think>Let me think about this step by step</think>The answer is 42.",
            ("Let me think about this step by step", "The answer is 42."),
        ),  # R1
        (
            "<think>I need to think<tool_call>tool call data",
            ("I need to think", "<tool_call>tool call data"),
        ),  # R2
        ("<think>This is incomplete", ("This is incomplete", "")),  # R4
        ("\n<think>x</think>y", ("x", "y")),  # leading whitespace before <think> is dropped in both modes
        ("<think><think>x</think>y</think>z", ("x", "y</think>z")),
    ],
)
def test_one_shot_vectors(text, expected, force):
    assert ReasoningParser("glm45", force).parse(text) == expected


def test_r8_forced_without_opening_tag():
    assert ReasoningParser("glm45", True).parse("abc</think>def") == ("abc", "def")


def test_not_forced_without_tags_is_all_content():
    assert ReasoningParser("glm45", False).parse("abc</think>def") == ("", "abc</think>def")
    assert ReasoningParser("glm45", False).parse("a <think>b") == ("", "a <think>b")


def test_forced_reasoning_text_keeps_its_whitespace():
    assert ReasoningParser("glm45", True).parse("  \nplan</think>\nanswer") == ("  \nplan", "\nanswer")


def test_r13_stream():
    assert feeds(ReasoningParser("glm45", False), ["<think>", "thinking...", "</think>answer"]) == [
        ("", ""),
        ("thinking...", ""),
        ("", "answer"),
        ("", ""),
    ]


def test_r17_partial_tags_are_held_back():
    assert feeds(ReasoningParser("glm45", False), ["<th", "ink>hel", "lo</th", "ink>wor", "ld"]) == [
        ("", ""),
        ("hel", ""),
        ("lo", ""),
        ("", "wor"),
        ("", "ld"),
        ("", ""),
    ]


def test_r19_forced_stream():
    assert feeds(ReasoningParser("glm45", True), ["abc", "</think>", "def"]) == [
        ("abc", ""),
        ("", ""),
        ("", "def"),
        ("", ""),
    ]


def test_partial_end_tag_at_finish_is_released_as_reasoning():
    assert feeds(ReasoningParser("glm45", True), ["abc</thi"]) == [("abc", ""), ("</thi", "")]
    assert feeds(ReasoningParser("glm45", True), ["x<tool_"]) == [("x", ""), ("<tool_", "")]


def test_tool_call_split_across_chunks_ends_reasoning():
    assert feeds(ReasoningParser("glm45", True), ["plan<to", "ol_call>f"]) == [
        ("plan", ""),
        ("", "<tool_call>f"),
        ("", ""),
    ]


def test_unknown_reasoning_parser_lists_valid_names():
    with pytest.raises(ValueError, match="glm45"):
        ReasoningParser("deepseek-r1", True)


def run_chain(chain: StreamingChatParser, chunks: list[str]) -> tuple[list[list], str, str, list]:
    per_feed = [chain.feed(c) for c in chunks] + [chain.finish()]
    events = [e for batch in per_feed for e in batch]
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    names = [e.name for e in events if isinstance(e, ToolCallStart)]
    args = "".join(e.fragment for e in events if isinstance(e, ToolCallArgs))
    return per_feed, reasoning, content, [(n, json.loads(args)) for n in names]


def test_e2e_glm45_forced_reasoning_then_call():
    chunks = [
        "<think>",
        "Need weather.",
        "</think>",
        "\n<tool_call>get_weather\n",
        "<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n",
        "</tool_call>",
    ]
    tool, reasoning = get_parsers("glm45", "glm45", W, True, stream_arguments=True)
    per_feed, r, c, calls = run_chain(StreamingChatParser(tool, reasoning), chunks)
    assert (r, c, calls) == ("Need weather.", "", [("get_weather", {"city": "Paris"})])
    assert [type(e) for e in per_feed[3]] == [ToolCallStart]  # the newline before the call is dropped


def test_e2e_glm47_forced_name_emitted_with_fourth_chunk_when_streaming_arguments():
    chunks = [
        "Need weather.",
        "</think>",
        "<tool_call>get_weather",
        "<arg_key>city</arg_key><arg_value>Paris</arg_value>",
        "</tool_call>",
    ]
    tool, reasoning = get_parsers("glm47", "glm45", W, True, stream_arguments=True)
    per_feed, r, c, calls = run_chain(StreamingChatParser(tool, reasoning), chunks)
    assert per_feed[2] == []
    assert isinstance(per_feed[3][0], ToolCallStart)
    assert (r, c, calls) == ("Need weather.", "", [("get_weather", {"city": "Paris"})])


def test_e2e_glm47_answer_without_tools():
    chunks = ["Let me think", " about it.", "</th", "ink>The answer", " is 4."]
    per_feed, r, c, calls = run_chain(StreamingChatParser(*get_parsers("glm47", "glm45", [], True)), chunks)
    assert per_feed[:5] == [
        [ReasoningDelta("Let me think")],
        [ReasoningDelta(" about it.")],
        [],
        [ContentDelta("The answer")],
        [ContentDelta(" is 4.")],
    ]
    assert (r, c, calls) == ("Let me think about it.", "The answer is 4.", [])


@pytest.mark.parametrize("stream_arguments", [False, True])
def test_e2e_glm47_call_without_end_of_thinking(stream_arguments):
    chunks = [
        "Need weather.<tool_call>get_weather",
        "<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>",
    ]
    chain = StreamingChatParser(*get_parsers("glm47", "glm45", W, True, stream_arguments=stream_arguments))
    _, r, c, calls = run_chain(chain, chunks)
    assert (r, c, calls) == ("Need weather.", "", [("get_weather", {"city": "Paris"})])
    one = chain.parse("".join(chunks))
    assert (one.reasoning, one.content, [(n, json.loads(a)) for n, a in one.calls]) == (r, c, calls)


def test_chain_finish_flushes_both_parsers():
    chain = StreamingChatParser(ToolCallParser("glm45", W), ReasoningParser("glm45", True))
    assert chain.feed("think</thi") == [ReasoningDelta("think")]
    assert chain.finish() == [ReasoningDelta("</thi")]
    chain = StreamingChatParser(ToolCallParser("glm45", W), ReasoningParser("glm45", True))
    chain.feed("t</think>see <tool_call>get_weather\n")
    assert chain.finish() == [ContentDelta(" <tool_call>get_weather")]


def test_get_parsers():
    tool, reasoning = get_parsers("glm47", "glm45", W, False)
    assert isinstance(tool, ToolCallParser) and tool.name == "glm47"
    assert reasoning.parse("plain") == ("", "plain")  # not forced
    assert get_parsers(None, None, W, True) == (None, None)
    assert get_parsers("glm45", None, None, True) == (None, None)  # no tools: no tool parsing
    with pytest.raises(ValueError, match="glm45"):
        get_parsers("qwen", None, W, True)
