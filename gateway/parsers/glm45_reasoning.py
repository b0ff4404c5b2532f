"""GLM reasoning parser (`glm45`, used for GLM-4.5/4.6/4.7): splits reasoning from the answer.

Rules (docs/parsers.md rule 6 and §4), identical in streaming and one-shot:
* `force_reasoning` (true unless `enable_thinking` is explicitly false): the output starts inside
  reasoning. `<think>` tags at the very start (after optional whitespace, which is then dropped)
  are stripped and also start reasoning when not forced.
* In reasoning, the first `</think>` ends reasoning (the tag is dropped); a `<tool_call>` ends it
  too and stays in the content. If neither comes, everything is reasoning (truncated thinking).
* After reasoning, everything is content verbatim (later tags included).
A suffix that could still become one of these tags is held back until decided, so no partial tag
leaks into either field; `finish()` releases it as text of the current field.
"""

from __future__ import annotations

import enum

from gateway.parsers.base import CALL_START, THINK_END, THINK_START, find_first, partial_tag_len

_ENDS = (THINK_END, CALL_START)


class _Phase(enum.Enum):
    START = "start"  # nothing decided yet: a leading <think> may still come
    REASONING = "reasoning"
    CONTENT = "content"


class Glm45ReasoningParser:
    def __init__(self, force_reasoning: bool = True) -> None:
        self._force = force_reasoning
        self._in_reasoning = force_reasoning
        self._phase = _Phase.START
        self._buf = ""
        self._finished = False

    def feed(self, text: str) -> tuple[str, str]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += text
        return self._run(final=False)

    def finish(self) -> tuple[str, str]:
        if self._finished:
            return "", ""
        self._finished = True
        return self._run(final=True)

    def parse(self, text: str) -> tuple[str, str]:
        """One-shot split of a complete output into (reasoning, content)."""
        parser = Glm45ReasoningParser(self._force)
        r1, c1 = parser.feed(text)
        r2, c2 = parser.finish()
        return r1 + r2, c1 + c2

    def _run(self, final: bool) -> tuple[str, str]:
        reasoning: list[str] = []
        content: list[str] = []
        if self._phase is _Phase.START:
            self._strip_leading_think(final)
        if self._phase is _Phase.REASONING:
            hit = find_first(self._buf, _ENDS)
            if hit is not None:
                pos, tag = hit
                reasoning.append(self._buf[:pos])
                self._buf = self._buf[pos + len(tag) :] if tag == THINK_END else self._buf[pos:]
                self._phase = _Phase.CONTENT
            else:
                end = len(self._buf) - (0 if final else partial_tag_len(self._buf, _ENDS))
                reasoning.append(self._buf[:end])
                self._buf = self._buf[end:]
        if self._phase is _Phase.CONTENT:
            content.append(self._buf)
            self._buf = ""
        return "".join(reasoning), "".join(content)

    def _strip_leading_think(self, final: bool) -> None:
        while True:
            head = self._buf.lstrip()
            if head.startswith(THINK_START):
                self._buf = head[len(THINK_START) :]
                self._in_reasoning = True
                continue
            if not final and (not head or THINK_START.startswith(head)):
                return  # could still be (whitespace and) a <think>
            self._phase = _Phase.REASONING if self._in_reasoning else _Phase.CONTENT
            return
