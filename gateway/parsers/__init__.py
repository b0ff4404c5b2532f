"""GLM output parsers: reasoning (`glm45`) and tool calls (`glm45`, `glm47`), torch-free.

For any split of an output into chunks, the streamed reasoning, content and calls equal the
one-shot parse (content up to its leading/trailing whitespace); see glm45_tool.py for the rules
on undeclared and unclosed calls. `StreamingChatParser` chains reasoning → tool calls the way the
gateway pipeline uses them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from gateway.parsers.base import (
    ChatDelta,
    ContentDelta,
    ParsedCall,
    ReasoningDelta,
    ToolCallArgs,
    ToolCallStart,
    ToolEvent,
)
from gateway.parsers.glm45_reasoning import Glm45ReasoningParser
from gateway.parsers.glm45_tool import Glm45ToolParser
from gateway.parsers.glm47_tool import Glm47ToolParser
from gateway.parsers.schema import ToolSchemas

__all__ = [
    "ChatDelta",
    "ChatParseResult",
    "ContentDelta",
    "ParsedCall",
    "ReasoningDelta",
    "ReasoningParser",
    "StreamingChatParser",
    "ToolCallArgs",
    "ToolCallParser",
    "ToolCallStart",
    "ToolEvent",
    "get_parsers",
]

TOOL_PARSERS: dict[str, type[Glm45ToolParser]] = {
    "glm": Glm45ToolParser,
    "glm45": Glm45ToolParser,
    "glm47": Glm47ToolParser,
}
REASONING_PARSERS: dict[str, type[Glm45ReasoningParser]] = {"glm45": Glm45ReasoningParser}


def _lookup(kind: str, registry: dict, name: str):
    if name not in registry:
        raise ValueError(f"unknown {kind} parser {name!r}; valid names: {', '.join(sorted(registry))}")
    return registry[name]


class ToolCallParser:
    """`ToolCallParser("glm45" | "glm47", tools)`: `feed`/`finish` → events; `parse` → (content, calls).

    `tools` are OpenAI tool dicts; their JSON schemas type the arguments. `stream_arguments=True`
    announces a call once its name is complete and streams its arguments (see glm45_tool.py).
    """

    def __init__(self, name: str, tools: Iterable[dict] | None, *, stream_arguments: bool = False):
        self.name = name
        self._impl = _lookup("tool-call", TOOL_PARSERS, name)(
            ToolSchemas(tools), stream_arguments=stream_arguments
        )

    def feed(self, text: str) -> list[ToolEvent]:
        return self._impl.feed(text)

    def finish(self) -> list[ToolEvent]:
        return self._impl.finish()

    def parse(self, text: str) -> tuple[str, list[ParsedCall]]:
        return self._impl.parse(text)


class ReasoningParser:
    """`ReasoningParser("glm45", force_reasoning)`: `feed`/`finish`/`parse` → (reasoning, content)."""

    def __init__(self, name: str, force_reasoning: bool = True):
        self.name = name
        self._impl = _lookup("reasoning", REASONING_PARSERS, name)(force_reasoning)

    def feed(self, text: str) -> tuple[str, str]:
        return self._impl.feed(text)

    def finish(self) -> tuple[str, str]:
        return self._impl.finish()

    def parse(self, text: str) -> tuple[str, str]:
        return self._impl.parse(text)


def get_parsers(
    tool_parser: str | None,
    reasoning_parser: str | None,
    tools: Iterable[dict] | None,
    force_reasoning: bool,
    *,
    stream_arguments: bool = False,
) -> tuple[ToolCallParser | None, ReasoningParser | None]:
    """Parsers for one request. No tool parser without tools (pass none for `tool_choice="none"`)."""
    tools = list(tools or ())
    tool = None
    if tool_parser:
        tool = ToolCallParser(tool_parser, tools, stream_arguments=stream_arguments)  # validates the name
        if not tools:
            tool = None
    reasoning = ReasoningParser(reasoning_parser, force_reasoning) if reasoning_parser else None
    return tool, reasoning


class ChatParseResult(NamedTuple):
    reasoning: str
    content: str
    calls: list[ParsedCall]


class StreamingChatParser:
    """Reasoning parser first; its content goes through the tool parser. Either may be absent."""

    def __init__(self, tool_parser: ToolCallParser | None, reasoning_parser: ReasoningParser | None):
        self._tool = tool_parser
        self._reasoning = reasoning_parser

    def feed(self, text: str) -> list[ChatDelta]:
        if self._reasoning is None:
            return self._content(text)
        reasoning, content = self._reasoning.feed(text)
        return ([ReasoningDelta(reasoning)] if reasoning else []) + self._content(content)

    def finish(self) -> list[ChatDelta]:
        out: list[ChatDelta] = []
        if self._reasoning is not None:
            reasoning, content = self._reasoning.finish()
            out += ([ReasoningDelta(reasoning)] if reasoning else []) + self._content(content)
        if self._tool is not None:
            out += self._tool.finish()
        return out

    def parse(self, text: str) -> ChatParseResult:
        """One-shot parse of a complete output (does not touch the streaming state)."""
        reasoning, content = self._reasoning.parse(text) if self._reasoning else ("", text)
        if self._tool is None:
            return ChatParseResult(reasoning, content, [])
        content, calls = self._tool.parse(content)
        return ChatParseResult(reasoning, content, calls)

    def _content(self, text: str) -> list[ChatDelta]:
        if self._tool is not None:
            return list(self._tool.feed(text)) if text else []
        return [ContentDelta(text)] if text else []
