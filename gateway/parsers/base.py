"""Shared types and text-scanning helpers of the GLM parsers (pure Python, torch-free).

Every parser here is a streaming state machine; its one-shot `parse` is `feed(whole) + finish()` on
a fresh instance, so "stream = one-shot" reduces to the machine being independent of how the text
is split. The helpers below give that independence: a parser consumes text only up to the first
complete tag, or up to the longest suffix that could still grow into a tag (that suffix is held
back until the next chunk or `finish()`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import NamedTuple

THINK_START = "<think>"
THINK_END = "</think>"
CALL_START = "<tool_call>"
CALL_END = "</tool_call>"
KEY_START = "<arg_key>"
KEY_END = "</arg_key>"
VALUE_START = "<arg_value>"
VALUE_END = "</arg_value>"


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A call is announced: `index` is its ordinal in the response, `id` is `call_` + 24 hex."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgs:
    """A piece of the call's arguments; the pieces of one call concatenate to a JSON object."""

    index: int
    fragment: str


ToolEvent = ContentDelta | ToolCallStart | ToolCallArgs
ChatDelta = ReasoningDelta | ContentDelta | ToolCallStart | ToolCallArgs


class ParsedCall(NamedTuple):
    name: str
    arguments: str  # JSON object text


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def find_first(text: str, tags: tuple[str, ...]) -> tuple[int, str] | None:
    """Earliest complete occurrence of any of `tags` in `text`, as (position, tag)."""
    best: tuple[int, str] | None = None
    for tag in tags:
        pos = text.find(tag)
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, tag)
    return best


def partial_tag_len(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags`."""
    longest = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), longest, -1):
            if text.endswith(tag[:n]):
                longest = n
                break
    return longest


class TrimmedText:
    """Passes a text stream through minus the leading and trailing whitespace of the whole stream.

    Whitespace at the end of a piece is held until non-whitespace follows, and dropped by
    `finish()`; so the concatenated output equals `whole.strip()` for any split.
    """

    def __init__(self) -> None:
        self._started = False
        self._pending = ""

    def push(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        body = text.rstrip()
        if not body:
            self._pending += text
            return ""
        out = self._pending + body
        self._pending = text[len(body) :]
        return out

    def finish(self) -> None:
        self._pending = ""
