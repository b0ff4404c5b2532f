"""GLM-4.5/4.6 tool-call parser (`glm45`): one streaming state machine, one-shot = feed + finish.

Wire format: `<tool_call>NAME⏎<arg_key>K</arg_key>⏎<arg_value>V</arg_value>⏎…</tool_call>`, where ⏎
is a newline or the two characters backslash-n (docs/parsers.md §3.1). Grammar, shared by both
modes:
* A call is `<tool_call>` up to the first `</tool_call>`. The name is the text before the first
  name terminator (`NAME_TERMINATORS`), whitespace-stripped; leading whitespace is skipped.
* Inside a call, text between tags is ignored; `<arg_key>K</arg_key>` then `<arg_value>V</arg_value>`
  makes an argument (a key with no value is dropped); a value still open at `</tool_call>` ends there.
  Values are decoded by the tool schema (`values.decode_value`).
* Text outside calls is content; the content of the whole response is whitespace-stripped.

Rules for calls that do not become tool calls (identical in streaming and one-shot):
* Undeclared name: the call's raw text, through its `</tool_call>`, is content. Streaming decides
  as soon as the name cannot become a declared name any more, then passes the text on as content.
* Unclosed call at the end of the output: its raw text is content.
Hence, by default, a call is emitted when its `</tool_call>` arrives: `ToolCallStart` and one
`ToolCallArgs` holding `json.dumps(arguments)`; all complete calls of a chunk come out of that feed.
With `stream_arguments=True` a call is announced as soon as its name is complete and declared, and
its arguments stream (plain-string values char by char, JSON-escaped; any other value as a whole at
`</arg_value>`, typed exactly as in one-shot). Then the one difference from one-shot is a call left
unclosed at `finish()`: it was already announced, so it is closed with the arguments seen so far
instead of becoming content.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Iterable
from typing import Any

from gateway.parsers.base import (
    CALL_END,
    CALL_START,
    KEY_END,
    KEY_START,
    VALUE_END,
    VALUE_START,
    ContentDelta,
    ParsedCall,
    ToolCallArgs,
    ToolCallStart,
    ToolEvent,
    TrimmedText,
    find_first,
    new_call_id,
    partial_tag_len,
)
from gateway.parsers.schema import ToolSchemas, ValueSpec
from gateway.parsers.values import decode_value

logger = logging.getLogger(__name__)


class _State(enum.Enum):
    TEXT = "text"  # outside calls
    NAME = "name"  # after <tool_call>, name not complete yet
    RAW = "raw"  # inside a call that is not a tool call (undeclared name): content
    BETWEEN = "between"  # inside a declared call, between arguments
    KEY = "key"  # after <arg_key>
    AFTER_KEY = "after_key"  # after </arg_key>
    VALUE = "value"  # after <arg_value>


# Tags that end (or switch) each in-call state; text before them is handled by the state.
_TAGS = {
    _State.BETWEEN: (KEY_START, CALL_END),
    _State.KEY: (KEY_END, CALL_END),
    _State.AFTER_KEY: (VALUE_START, KEY_START, CALL_END),
    _State.VALUE: (VALUE_END, CALL_END),
}


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


class Glm45ToolParser:
    NAME_TERMINATORS: tuple[str, ...] = ("\n", "\\n", KEY_START, CALL_END)

    def __init__(self, tools: Iterable[dict] | ToolSchemas | None, *, stream_arguments: bool = False):
        self._schemas = tools if isinstance(tools, ToolSchemas) else ToolSchemas(tools)
        self._stream_args = stream_arguments
        self._state = _State.TEXT
        self._buf = ""  # received, not consumed yet
        self._content = TrimmedText()
        self._calls = 0  # calls emitted (or announced) so far
        self._finished = False
        self._out: list[ToolEvent] = []
        self._new_call()

    # -- public API ---------------------------------------------------------------------------

    def feed(self, text: str) -> list[ToolEvent]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += text
        while self._step():
            pass
        return self._take()

    def finish(self) -> list[ToolEvent]:
        if self._finished:
            return []
        self._finished = True
        state, rest = self._state, self._buf
        self._buf = ""
        if state in (_State.TEXT, _State.RAW):
            self._emit_content(rest)
        elif state is _State.NAME or not self._stream_args:
            logger.warning("unclosed tool call at end of output; returned as content")
            self._emit_content("".join(self._raw) + rest)
        else:  # announced call left open: close it with what was seen
            if state is _State.VALUE:
                self._value_text(rest)
                self._end_value()
            self._close_call()
        self._content.finish()
        return self._take()

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        """One-shot parse of a complete output: (content, [(name, arguments JSON)])."""
        parser = type(self)(self._schemas)
        events = parser.feed(text) + parser.finish()
        content = "".join(e.text for e in events if isinstance(e, ContentDelta))
        names = {e.index: e.name for e in events if isinstance(e, ToolCallStart)}
        args: dict[int, str] = {}
        for e in events:
            if isinstance(e, ToolCallArgs):
                args[e.index] = args.get(e.index, "") + e.fragment
        return content, [ParsedCall(names[i], args.get(i, "{}")) for i in sorted(names)]

    # -- state machine ------------------------------------------------------------------------

    def _new_call(self) -> None:
        self._raw: list[str] = []  # raw text of the current call consumed so far
        self._name = ""
        self._index = -1
        self._args: dict[str, Any] = {}
        self._opened = False  # streamed "{" yet
        self._key = ""
        self._value: list[str] = []
        self._spec = ValueSpec()

    def _step(self) -> bool:
        """Advance by at most one tag; False when waiting for more text."""
        if self._state is _State.TEXT:
            text, tag = self._scan((CALL_START,))
            self._emit_content(text)
            if tag:
                self._new_call()
                self._raw = [CALL_START]
                self._state = _State.NAME
            return tag is not None
        if self._state is _State.RAW:
            text, tag = self._scan((CALL_END,))
            self._emit_content(text + (tag or ""))
            if tag:
                self._state = _State.TEXT
            return tag is not None
        if self._state is _State.NAME:
            return self._step_name()
        text, tag = self._scan(_TAGS[self._state], keep_raw=True)
        return self._in_call(text, tag)

    def _scan(self, tags: tuple[str, ...], keep_raw: bool = False) -> tuple[str, str | None]:
        """Consume up to and including the first of `tags`, or all text that cannot start one."""
        hit = find_first(self._buf, tags)
        if hit is None:
            end = len(self._buf) - partial_tag_len(self._buf, tags)
            text, tag, self._buf = self._buf[:end], None, self._buf[end:]
        else:
            pos, tag = hit
            text, self._buf = self._buf[:pos], self._buf[pos + len(tag) :]
        if keep_raw:
            self._raw += (text, tag or "")
        return text, tag

    def _step_name(self) -> bool:
        body = self._buf
        lead = len(body) - len(body.lstrip())
        hit = find_first(body[lead:], self.NAME_TERMINATORS)
        if hit is None:
            head = body[: len(body) - partial_tag_len(body, self.NAME_TERMINATORS)]
            if self._schemas.could_be_name(head):
                return False
            self._to_raw(head)
            return True
        pos, tag = hit[0] + lead, hit[1]
        name = body[lead:pos].strip()
        if name not in self._schemas.names:
            self._to_raw(name)
            return True
        # <arg_key> and </tool_call> stay in the buffer: the argument states handle them.
        end = pos if tag in (KEY_START, CALL_END) else pos + len(tag)
        self._raw.append(body[:end])
        self._buf = body[end:]
        self._name = name
        self._state = _State.BETWEEN
        if self._stream_args:
            self._announce()
        return True

    def _to_raw(self, name: str) -> None:
        logger.warning("model called undeclared tool %r; its text is returned as content", name.strip())
        self._buf = "".join(self._raw) + self._buf
        self._state = _State.RAW

    def _in_call(self, text: str, tag: str | None) -> bool:
        state = self._state
        if state is _State.KEY:
            self._key += text
        elif state is _State.VALUE:
            self._value_text(text)
        if tag is None:
            return False
        if tag == CALL_END:
            if state is _State.VALUE:
                self._end_value()
            self._close_call()
        elif tag == KEY_START:
            self._key = ""
            self._state = _State.KEY
        elif tag == KEY_END:
            self._state = _State.AFTER_KEY
        elif tag == VALUE_START:
            self._begin_value()
        else:  # VALUE_END
            self._end_value()
        return True

    # -- arguments ----------------------------------------------------------------------------

    def _begin_value(self) -> None:
        self._key = self._key.strip()
        self._spec = self._schemas.spec(self._name, self._key)
        self._value = []
        self._state = _State.VALUE
        if self._stream_args and self._spec.is_plain_string:
            self._emit_args(self._arg_prefix() + '"')

    def _value_text(self, text: str) -> None:
        self._value.append(text)
        if text and self._stream_args and self._spec.is_plain_string:
            self._emit_args(_dumps(text)[1:-1])

    def _end_value(self) -> None:
        value = decode_value("".join(self._value), self._spec)
        self._args[self._key] = value
        if self._stream_args:
            self._emit_args('"' if self._spec.is_plain_string else self._arg_prefix() + _dumps(value))
        self._state = _State.BETWEEN

    def _arg_prefix(self) -> str:
        prefix = (", " if self._opened else "{") + _dumps(self._key) + ": "
        self._opened = True
        return prefix

    def _announce(self) -> None:
        self._index = self._calls
        self._calls += 1
        self._out.append(ToolCallStart(self._index, new_call_id(), self._name))

    def _close_call(self) -> None:
        if self._stream_args:
            self._emit_args("}" if self._opened else "{}")
        else:
            self._announce()
            self._emit_args(_dumps(self._args))
        self._state = _State.TEXT
        self._new_call()

    # -- output -------------------------------------------------------------------------------

    def _emit_content(self, text: str) -> None:
        text = self._content.push(text)
        if not text:
            return
        if self._out and isinstance(self._out[-1], ContentDelta):
            self._out[-1] = ContentDelta(self._out[-1].text + text)
        else:
            self._out.append(ContentDelta(text))

    def _emit_args(self, fragment: str) -> None:
        last = self._out[-1] if self._out else None
        if isinstance(last, ToolCallArgs) and last.index == self._index:
            self._out[-1] = ToolCallArgs(self._index, last.fragment + fragment)
        else:
            self._out.append(ToolCallArgs(self._index, fragment))

    def _take(self) -> list[ToolEvent]:
        out, self._out = self._out, []
        return out
