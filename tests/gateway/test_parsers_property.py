"""Property tests: for any split of an output, streaming equals the one-shot parse, and the one-shot
parse of generated well-formed outputs equals what was generated (typed arguments, kept text)."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.parsers import (
    ContentDelta,
    ReasoningDelta,
    ReasoningParser,
    StreamingChatParser,
    ToolCallArgs,
    ToolCallParser,
    ToolCallStart,
)

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "count": {"type": "integer"},
                    "ratio": {"type": "number"},
                    "flag": {"type": "boolean"},
                    "filters": {"type": "object"},
                    "tags": {"type": "array"},
                    "note": {"type": ["string", "null"]},
                },
            },
        },
    },
    {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}},
]
UNDECLARED = ["bogus", "get_weathe", "noop2", "get_weather_x"]
TAGS = [
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<arg_key>",
    "</arg_key>",
    "<arg_value>",
    "</arg_value>",
]

# Pieces of free text: CJK, emoji, quotes, newlines, backslashes, and tag look-alikes.
PIECES = [
    "a",
    "Z",
    " ",
    "  ",
    "\n",
    "\\",
    "\\n",
    "北京",
    "😀",
    '"',
    "'",
    "<",
    ">",
    "/",
    "<tool",
    "</tool",
    "<arg_",
    "</arg_value",
    "</think",
    "<thi",
    "{",
    "}",
    "42",
    "true",
    "null",
    "123_456",
    "007",
    "é",
]
TEXT = st.lists(st.sampled_from(PIECES), max_size=8).map("".join)
VALUE_TEXT = st.lists(st.sampled_from(PIECES + ["<arg_key>", "</arg_key>", "<arg_value>"]), max_size=8).map(
    "".join
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=6,
)


def _json(value: Any, ascii_: bool) -> str:
    return json.dumps(value, ensure_ascii=ascii_)


def _loads(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return ...


# Each argument: strategy of (raw text in the output, the value the parser must produce).
ARGS = {
    "city": VALUE_TEXT.map(lambda s: (s, s)),
    "count": st.integers(-(10**20), 10**20).map(lambda n: (str(n), n)),
    "ratio": st.floats(allow_nan=False, allow_infinity=False).map(lambda x: (json.dumps(x), x)),
    "flag": st.booleans().map(lambda b: (json.dumps(b), b)),
    "filters": st.tuples(st.dictionaries(TEXT, JSON_VALUES, max_size=3), st.booleans()).map(
        lambda t: (_json(t[0], t[1]), t[0])
    ),
    "tags": st.tuples(st.lists(JSON_VALUES, max_size=3), st.booleans()).map(
        lambda t: (_json(t[0], t[1]), t[0])
    ),
    "note": VALUE_TEXT.map(lambda s: (s, None if _loads(s) is None else s)),
    "extra": st.one_of(  # undeclared: JSON when valid JSON, else the raw text
        st.tuples(JSON_VALUES, st.booleans()).map(lambda t: (_json(t[0], t[1]), t[0])),
        VALUE_TEXT.map(lambda s: ("x" + s, "x" + s)),
    ),
}


@dataclass
class Output:
    text: str = ""
    content: list[str] = field(default_factory=list)  # expected content pieces
    calls: list[tuple[str, dict]] = field(default_factory=list)
    unclosed: bool = False


@st.composite
def call_text(draw, fmt: str, name: str) -> tuple[str, dict]:
    # noop declares no argument, so all of its arguments follow the undeclared rule ("extra").
    keys = draw(
        st.lists(
            st.sampled_from(sorted(ARGS) if name != "noop" else ["extra", "more"]), unique=True, max_size=4
        )
    )
    sep = (
        (lambda: draw(st.sampled_from(["", "\n", "\\n"])))
        if fmt == "glm45"
        else (lambda: draw(st.sampled_from(["", "\n"])))
    )
    head = draw(st.sampled_from(["\n", "\\n"])) if fmt == "glm45" else ""
    text, args = "<tool_call>" + name + head, {}
    for key in keys:
        raw, value = draw(ARGS.get(key, ARGS["extra"]))
        assume("</arg_value>" not in raw and "</tool_call>" not in raw)  # a value ends at either tag
        text += f"<arg_key>{key}</arg_key>{sep()}<arg_value>{raw}</arg_value>{sep()}"
        args[key] = value
    return text + "</tool_call>", args


@st.composite
def tool_outputs(draw, fmt: str, allow_unclosed: bool = True) -> Output:
    out = Output()
    for _ in range(draw(st.integers(0, 4))):
        piece = draw(TEXT)
        out.text += piece
        out.content.append(piece)
        kind = draw(st.sampled_from(["declared", "declared", "undeclared"]))
        name = draw(st.sampled_from(["get_weather", "noop"] if kind == "declared" else UNDECLARED))
        text, args = draw(call_text(fmt, name))
        out.text += text
        if kind == "declared":
            out.calls.append((name, args))
        else:
            out.content.append(text)
    tail = draw(TEXT)
    out.text += tail
    out.content.append(tail)
    if allow_unclosed and draw(st.booleans()):
        text, _ = draw(call_text(fmt, draw(st.sampled_from(["get_weather", "noop"] + UNDECLARED))))
        cut = draw(st.integers(len("<tool_call>"), len(text) - 1))
        out.text += text[:cut]
        out.content.append(text[:cut])
        out.unclosed = True
    return out


@st.composite
def splits(draw, text: str) -> list[str]:
    cuts = sorted(set(draw(st.lists(st.integers(0, len(text)), max_size=12))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def collect(events: list) -> tuple[str, list[tuple[str, Any]]]:
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [s.index for s in starts] == list(range(len(starts)))
    args = {s.index: "" for s in starts}
    for e in events:
        if isinstance(e, ToolCallArgs):
            args[e.index] += e.fragment
    return content, [(s.name, json.loads(args[s.index])) for s in starts]


def stream(parser, chunks: list[str]) -> list:
    return [e for c in chunks for e in parser.feed(c)] + parser.finish()


def one_shot(fmt: str, text: str) -> tuple[str, list[tuple[str, Any]]]:
    content, calls = ToolCallParser(fmt, TOOLS).parse(text)
    return content, [(n, json.loads(a)) for n, a in calls]


def assert_same_calls(got: list, want: list) -> None:
    # Compare through JSON text so that 1 vs 1.0 vs True stay distinct.
    assert [(n, json.dumps(a, sort_keys=True)) for n, a in got] == [
        (n, json.dumps(a, sort_keys=True)) for n, a in want
    ]


FORMATS = st.sampled_from(["glm45", "glm47"])


@SETTINGS
@given(st.data(), FORMATS)
def test_one_shot_recovers_generated_output_and_stream_matches(data, fmt):
    out = data.draw(tool_outputs(fmt))
    content, calls = one_shot(fmt, out.text)
    assert content == "".join(out.content).strip()
    assert_same_calls(calls, out.calls)
    chunks = data.draw(splits(out.text))
    assert "".join(chunks) == out.text
    s_content, s_calls = collect(stream(ToolCallParser(fmt, TOOLS), chunks))
    assert s_content == content
    assert_same_calls(s_calls, calls)


@SETTINGS
@given(st.data(), FORMATS)
def test_stream_arguments_mode_matches_one_shot_for_closed_calls(data, fmt):
    out = data.draw(tool_outputs(fmt, allow_unclosed=False))
    chunks = data.draw(splits(out.text))
    s_content, s_calls = collect(stream(ToolCallParser(fmt, TOOLS, stream_arguments=True), chunks))
    assert s_content == "".join(out.content).strip()
    assert_same_calls(s_calls, out.calls)


@settings(max_examples=40, deadline=None)
@given(st.data(), FORMATS, st.booleans())
def test_one_character_at_a_time(data, fmt, stream_arguments):
    out = data.draw(tool_outputs(fmt, allow_unclosed=not stream_arguments))
    s_content, s_calls = collect(
        stream(ToolCallParser(fmt, TOOLS, stream_arguments=stream_arguments), list(out.text))
    )
    assert s_content == "".join(out.content).strip()
    assert_same_calls(s_calls, out.calls)


# Arbitrary mixes of tags, names, values and text: malformed calls included.
SOUP = st.lists(
    st.sampled_from(
        TAGS * 3
        + PIECES
        + ["get_weather", "noop", "bogus", "city", "count", "flag", "note", "7", "[1, 2]", '{"a": 1}']
    ),
    max_size=40,
).map("".join)


@SETTINGS
@given(st.data(), SOUP, FORMATS)
def test_any_text_streams_like_one_shot(data, text, fmt):
    content, calls = one_shot(fmt, text)
    if "<tool_call>" not in text:
        assert (content, calls) == (text.strip(), [])
    chunks = data.draw(splits(text))
    s_content, s_calls = collect(stream(ToolCallParser(fmt, TOOLS), chunks))
    assert s_content == content
    assert_same_calls(s_calls, calls)
    # With streamed arguments only a call left open at the end may differ: announced, not content.
    i_content, i_calls = collect(stream(ToolCallParser(fmt, TOOLS, stream_arguments=True), chunks))
    assert_same_calls(i_calls[: len(calls)], calls)
    if len(i_calls) == len(calls):
        assert i_content == content
    else:
        assert len(i_calls) == len(calls) + 1
        assert content.startswith(i_content) and "<tool_call>" in content[len(i_content) :]


@SETTINGS
@given(st.data(), SOUP, st.booleans())
def test_reasoning_streams_like_one_shot(data, text, force):
    want = ReasoningParser("glm45", force).parse(text)
    parser = ReasoningParser("glm45", force)
    got = [parser.feed(c) for c in data.draw(splits(text))] + [parser.finish()]
    assert ("".join(r for r, _ in got), "".join(c for _, c in got)) == want
    assert len(want[0]) + len(want[1]) <= len(text)
    if not force and not text.lstrip().startswith("<think>"):
        assert want == ("", text)


@SETTINGS
@given(st.data(), FORMATS, TEXT, st.booleans())
def test_chain_reasoning_then_tools(data, fmt, reasoning, open_tag):
    assume("</think>" not in reasoning)
    body = data.draw(tool_outputs(fmt))
    text = ("<think>" if open_tag else "") + reasoning + "</think>" + body.text
    chain = StreamingChatParser(ToolCallParser(fmt, TOOLS), ReasoningParser("glm45", True))
    events = stream(chain, data.draw(splits(text)))
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == reasoning
    s_content, s_calls = collect(events)
    assert s_content == "".join(body.content).strip()
    assert_same_calls(s_calls, body.calls)
    one = chain.parse(text)
    assert (one.reasoning, one.content) == (reasoning, s_content)
    assert_same_calls([(n, json.loads(a)) for n, a in one.calls], body.calls)


@SETTINGS
@given(st.data(), SOUP, FORMATS, st.booleans())
def test_chain_any_text_streams_like_one_shot(data, text, fmt, force):
    chain = StreamingChatParser(ToolCallParser(fmt, TOOLS), ReasoningParser("glm45", force))
    events = stream(chain, data.draw(splits(text)))
    one = chain.parse(text)
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == one.reasoning
    s_content, s_calls = collect(events)
    assert s_content == one.content
    assert_same_calls(s_calls, [(n, json.loads(a)) for n, a in one.calls])
