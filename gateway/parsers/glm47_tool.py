"""GLM-4.7 tool-call parser (`glm47`): the `glm45` machine with GLM-4.7's name rule.

Wire format: `<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>…</tool_call>` with no
separators (docs/parsers.md §3.1). The name ends at `<arg_key>` or, for a call without arguments,
at `</tool_call>`; it is whitespace-stripped, so `NAME⏎<arg_key>` is accepted too (as SGLang's
streaming path does). Everything else (typing, undeclared/unclosed calls, streaming) is shared; see
`glm45_tool`.
"""

from __future__ import annotations

from gateway.parsers.base import CALL_END, KEY_START
from gateway.parsers.glm45_tool import Glm45ToolParser


class Glm47ToolParser(Glm45ToolParser):
    NAME_TERMINATORS = (KEY_START, CALL_END)
