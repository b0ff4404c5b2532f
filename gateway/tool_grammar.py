"""GLM tool calls under a grammar: the EBNF (xgrammar's dialect, start rule `root`) that makes the answer
GLM's native tool-call text with arguments that satisfy each tool's parameter schema.

Used for tool_choice "required" (one or more calls of the shown tools) and a named tool (exactly one
call of it); the worker applies it after the reasoning (`reasoning_first`), so the reasoning stays
free text. Under tool_choice "auto" with a strict tool, the same per-tool argument grammars go in an
xgrammar structural tag (`tool_call_structural_tag`): free text until `<tool_call>`, then one of the
tools' calls, then free text again. The layout is the chat template's (docs/parsers.md §2, §3.1):

    glm45: "\\n"? "<tool_call>" NAME "\\n" ("<arg_key>" K "</arg_key>\\n<arg_value>" V "</arg_value>\\n")* "</tool_call>"
    glm47: "\\n"? "<tool_call>" NAME ("<arg_key>" K "</arg_key><arg_value>" V "</arg_value>")* "</tool_call>"

Each argument's value V is written the way the tool parser reads it back (`parsers/values.py`, by the
same `ToolSchemas` lookup): an argument whose schema admits only strings, or strings and
unconstrained scalars, is raw text (never `<`); any other argument is compact JSON (strings in it
never hold a raw `<`: they may use `\\u003c`).
Required arguments always appear, optional ones may, in the schema's order; no undeclared argument.

JSON Schema subset turned into rules: type (one or a list) object / array / string / number /
integer / boolean / null, enum, const, properties + required, additionalProperties (extra properties
are never written), items, minItems / maxItems, minLength / maxLength, anyOf, and annotations
(title, description, default, examples, ...). Any other keyword ($ref, pattern, minimum, format,
oneOf, allOf, ...) cannot be enforced: a tool with `strict: true` is refused naming the keyword
(`ToolGrammarError`); for any other tool the keyword is left unenforced (its arguments still get
their types where the schema says them; an argument whose schema says nothing usable is free text).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.parsers.base import CALL_END, CALL_START
from gateway.parsers.schema import ToolSchemas

KEYWORDS = frozenset({"type", "enum", "const", "properties", "required", "additionalProperties", "items",
                      "minItems", "maxItems", "minLength", "maxLength", "anyOf"})
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "deprecated", "readOnly",
                         "writeOnly", "$schema", "$id", "strict"})
_SCALARS_FOR_RAW = frozenset({"null", "boolean", "integer", "number"})

# Shared JSON rules (added once, by name).
_JSON_RULES = {
    "json_char": r'[^"\\<\x00-\x1f] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "json_string": r'"\"" json_char* "\""',
    "json_integer": r'"-"? ("0" | [1-9] [0-9]{0,15})',
    "json_number": r'json_integer ("." [0-9]{1,15})? ([eE] [+-]? [0-9]{1,2})?',  # finite: at most ~1e115
    "json_value": r'json_object | json_array | json_string | json_number | "true" | "false" | "null"',
    "json_member": r'json_string ":" " "? json_value',
    "json_object": r'"{" (json_member ("," " "? json_member)*)? "}"',
    "json_array": r'"[" (json_value ("," " "? json_value)*)? "]"',
}


class ToolGrammarError(ValueError):
    """A strict tool whose schema the grammar cannot enforce; `path` is inside its `parameters`."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path} {problem}")
        self.path = path
        self.problem = problem
        self.index: int | None = None  # the tool's position in the list given to tool_call_grammar


@dataclass(frozen=True)
class Layout:
    after_name: str   # between NAME and the first <arg_key> (or </tool_call>)
    after_key: str    # between </arg_key> and <arg_value>
    after_value: str  # after </arg_value>


LAYOUTS = {"glm45": Layout("\n", "\n", "\n"), "glm47": Layout("", "", "")}


def literal(text: str) -> str:
    """`text` as an EBNF string literal."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def json_text(value: Any) -> str:
    """Compact JSON of a value, with `<` escaped (a raw `<` could end the argument early)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], family: str, *, single: bool) -> str:
    """The EBNF for the answer of a tool_choice "required" (`single` False: one or more calls, each of
    any tool) or named (`single` True, one tool: exactly one call). Raises ToolGrammarError (with
    the tool's index in `tools` as `index`) for a strict tool outside the subset."""
    layout = LAYOUTS[family]
    builder = _Builder(ToolSchemas(tools))
    calls = []
    for i, tool in enumerate(tools):
        fn = tool["function"]
        try:
            calls.append(builder.call(fn, layout, strict=fn.get("strict") is True))
        except ToolGrammarError as e:
            e.index = i
            raise
    call = " | ".join(calls)
    root = f'"\\n"? ({call})' if single else f'"\\n"? ({call}) ("\\n"? ({call}))*'
    return builder.text(root)


def tool_call_structural_tag(tools: Sequence[Mapping[str, Any]], family: str) -> str:
    """tool_choice "auto" with strict tools: xgrammar's structural tag (JSON) that leaves the text free
    until `<tool_call>`, then holds the call to one of `tools` (each tool's name and arguments as in
    `tool_call_grammar`), then frees the text again. Every tool gets a tag, strict or not, so that a
    call of a non-strict tool is still possible."""
    layout = LAYOUTS[family]
    schemas = ToolSchemas(tools)
    tags = []
    for i, tool in enumerate(tools):
        fn = tool["function"]
        builder = _Builder(schemas)
        try:
            args = builder.arguments(fn, layout, strict=fn.get("strict") is True)
        except ToolGrammarError as e:
            e.index = i
            raise
        tags.append({"type": "tag", "begin": CALL_START + fn["name"] + layout.after_name,
                     "content": {"type": "grammar", "grammar": builder.text(args)}, "end": CALL_END})
    return json.dumps({"type": "structural_tag", "format": {
        "type": "triggered_tags", "triggers": [CALL_START], "tags": tags, "at_least_one": False,
        "stop_after_first": False}}, ensure_ascii=False)


def _types(node: Mapping[str, Any]) -> list[str]:
    declared = node.get("type")
    if isinstance(declared, str):
        return [declared]
    if isinstance(declared, list):
        return [t for t in declared if isinstance(t, str)]
    if "properties" in node:
        return ["object"]
    if "items" in node:
        return ["array"]
    return []


class _Builder:
    def __init__(self, schemas: ToolSchemas) -> None:
        self.schemas = schemas
        self.rules: dict[str, str] = {}
        self._names: dict[str, str] = {}  # body -> rule name

    def text(self, root: str) -> str:
        lines = [f"root ::= {root}"] + [f"{name} ::= {body}" for name, body in self.rules.items()]
        return "\n".join(lines) + "\n"

    def rule(self, hint: str, body: str) -> str:
        if body in self._names:
            return self._names[body]
        name = f"r{len(self.rules)}_{re.sub(r'[^A-Za-z0-9_]', '_', hint)[:24]}"
        self.rules[name] = body
        self._names[body] = name
        return name

    def shared(self, name: str) -> str:
        if name not in self.rules:
            self.rules[name] = _JSON_RULES[name]
            for dep in re.findall(r"\bjson_[a-z]+\b", _JSON_RULES[name]):
                self.shared(dep)
        return name

    # -- one call ------------------------------------------------------------------------------

    def call(self, fn: Mapping[str, Any], layout: Layout, *, strict: bool) -> str:
        body = [literal(CALL_START + fn["name"] + layout.after_name), self.arguments(fn, layout, strict=strict),
                literal(CALL_END)]
        return self.rule(f"call_{fn['name']}", " ".join(body))

    def arguments(self, fn: Mapping[str, Any], layout: Layout, *, strict: bool) -> str:
        """The text between the name and `</tool_call>`: each argument's key and value."""
        name = fn["name"]
        params = fn.get("parameters") or {}
        self.check(params, "", strict, top=True)
        props = params.get("properties") or {}
        required = params.get("required") or []
        parts = ['""']
        for key, sub in props.items():
            value = self.argument(name, key, sub, f".properties.{key}", strict)
            arg = (f'{literal("<arg_key>" + key + "</arg_key>" + layout.after_key + "<arg_value>")} {value} '
                   f'{literal("</arg_value>" + layout.after_value)}')
            parts.append(arg if key in required else f"({arg})?")
        return self.rule(f"args_{name}", " ".join(parts))

    def argument(self, tool: str, key: str, node: Any, path: str, strict: bool) -> str:
        """The value text of one argument, as the parser decodes it (values.decode_value)."""
        spec = self.schemas.spec(tool, key)
        if spec.is_plain_string:
            return self.raw_string(node)
        if spec.types is None and spec.enum is None:
            return self.rule("raw", "[^<]*")
        if spec.enum is None and "string" in spec.types:
            # Raw text reads back as that string, or as the JSON value it spells when that value's
            # type is admitted too: schema-valid only when every admitted type is unconstrained.
            if _open_types(node) != spec.types or not spec.types - {"string"} <= _SCALARS_FOR_RAW:
                if strict:
                    raise ToolGrammarError(path, "mixes string with other types in a way the tool-call format "
                                                 "cannot enforce (supported: a string, length-bounded or not, "
                                                 "with unconstrained null / boolean / integer / number types)")
                return self.rule("raw", "[^<]*")
            return self.rule("raw", "[^<]" + _repeat(node, "minLength", "maxLength"))
        return self.value(node, path, strict)

    def raw_string(self, node: Any) -> str:
        """A string argument: its exact raw text (enum / const literals, or up to the length bounds)."""
        if not isinstance(node, Mapping):
            return self.rule("raw", "[^<]*")
        if "const" in node:
            return literal(str(node["const"]))
        if isinstance(node.get("enum"), list) and node["enum"]:
            return "(" + " | ".join(literal(str(v)) for v in node["enum"]) + ")"
        if isinstance(node.get("anyOf"), list) and node["anyOf"]:
            return "(" + " | ".join(self.raw_string(b) for b in node["anyOf"]) + ")"
        return self.rule("raw", "[^<]" + _repeat(node, "minLength", "maxLength"))

    # -- JSON values --------------------------------------------------------------------------

    def value(self, node: Any, path: str, strict: bool) -> str:
        if node is True or (isinstance(node, Mapping) and not set(node) - ANNOTATIONS):
            return self.shared("json_value")
        if not isinstance(node, Mapping):  # false (no value is valid) or not a schema at all
            if strict:
                raise ToolGrammarError(path, "must be a JSON schema object")
            return self.shared("json_value")
        if "const" in node:
            return literal(json_text(node["const"]))
        if isinstance(node.get("enum"), list) and node["enum"]:
            return "(" + " | ".join(literal(json_text(v)) for v in node["enum"]) + ")"
        if isinstance(node.get("anyOf"), list) and node["anyOf"]:
            branches = [self.value(b, f"{path}.anyOf[{i}]", strict) for i, b in enumerate(node["anyOf"])]
            return "(" + " | ".join(branches) + ")"
        types = _types(node)
        if not types:
            return self.shared("json_value")
        alts = [self.typed(t, node, path, strict) for t in dict.fromkeys(types)]
        return alts[0] if len(alts) == 1 else "(" + " | ".join(alts) + ")"

    def typed(self, kind: str, node: Mapping[str, Any], path: str, strict: bool) -> str:
        if kind == "string":
            if "minLength" in node or "maxLength" in node:
                return self.rule("string", '"\\"" ' + self.shared("json_char") + _repeat(node, "minLength", "maxLength")
                                 + ' "\\""')
            return self.shared("json_string")
        if kind == "integer":
            return self.shared("json_integer")
        if kind == "number":
            return self.shared("json_number")
        if kind == "boolean":
            return '("true" | "false")'
        if kind == "null":
            return '"null"'
        if kind == "array":
            return self.array(node, path, strict)
        if kind == "object":
            return self.object(node, path, strict)
        if strict:
            raise ToolGrammarError(f"{path}.type", f"names an unknown type {kind!r}")
        return self.shared("json_value")

    def array(self, node: Mapping[str, Any], path: str, strict: bool) -> str:
        item = self.value(node.get("items", True), f"{path}.items", strict)
        low, high = _bounds(node, "minItems", "maxItems")
        if high == 0:
            return '"[]"'
        more = f'("," " "? {item})'
        if low >= 1:
            body = f'"[" {item} {more}{_suffix(low - 1, None if high is None else high - 1)} "]"'
        else:
            body = f'"[" ({item} {more}{_suffix(0, None if high is None else high - 1)})? "]"'
        return self.rule("array", body)

    def object(self, node: Mapping[str, Any], path: str, strict: bool) -> str:
        props = node.get("properties") or {}
        if not props:
            return '"{}"' if node.get("additionalProperties") is False else self.shared("json_object")
        required = set(node.get("required") or [])
        members = [f'{literal(json_text(k))} ":" " "? {self.value(sub, f"{path}.properties.{k}", strict)}'
                   for k, sub in props.items()]
        # first[i]: members i.. with no comma before the next one written; after[i]: with a comma.
        first, after = '""', '""'
        for i in range(len(members) - 1, -1, -1):
            key = list(props)[i]
            m = members[i]
            new_after = f'"," " "? {m} {after}'
            new_first = f"{m} {after}"
            if key not in required:
                new_after = f"({new_after}) | {after}"
                new_first = f"({new_first}) | {first}"
            after = self.rule("obj_rest", new_after)
            first = self.rule("obj_first", new_first)
        return self.rule("object", f'"{{" {first} "}}"')

    # -- the subset --------------------------------------------------------------------------

    def check(self, node: Any, path: str, strict: bool, top: bool = False) -> None:
        """Refuse (strict) what the grammar cannot enforce; recurse through every sub-schema."""
        if not strict or not isinstance(node, Mapping):
            return
        for key in node:
            if key not in KEYWORDS and key not in ANNOTATIONS:
                raise ToolGrammarError(f"{path}.{key}", f"cannot be enforced for a strict tool (supported: "
                                                        f"{', '.join(sorted(KEYWORDS))})")
        if top and "anyOf" in node:
            raise ToolGrammarError(f"{path}.anyOf", "cannot be enforced at the top of a strict tool's parameters")
        if "anyOf" in node and set(node) - ANNOTATIONS - {"anyOf"}:
            raise ToolGrammarError(f"{path}.anyOf", "cannot be combined with sibling keywords in a strict tool")
        for bound in ("minItems", "maxItems", "minLength", "maxLength"):
            v = node.get(bound)
            if bound in node and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ToolGrammarError(f"{path}.{bound}", "must be an integer >= 0")
        for low, high in (("minItems", "maxItems"), ("minLength", "maxLength")):
            if high in node and node.get(low, 0) > node[high]:
                raise ToolGrammarError(f"{path}.{low}", f"is above {high}")
        props = node.get("properties") or {}
        for name in node.get("required") or []:
            if name not in props:
                raise ToolGrammarError(f"{path}.required", f"names {name!r}, which is not in properties")
        for key, sub in props.items():
            self.check(sub, f"{path}.properties.{key}", strict)
        if isinstance(node.get("items"), Mapping):
            self.check(node["items"], f"{path}.items", strict)
        for i, sub in enumerate(node.get("anyOf") or []):
            self.check(sub, f"{path}.anyOf[{i}]", strict)


def _open_types(node: Any) -> frozenset[str] | None:
    """The types `node` admits when it constrains nothing but them (and, on a type list, the string's
    length): {"type": ["string", "null"]}, or anyOf of such branches without length bounds; None
    for any other schema."""
    if not isinstance(node, Mapping):
        return None
    keys = set(node) - ANNOTATIONS
    branches = node.get("anyOf")
    if keys == {"anyOf"} and isinstance(branches, list) and branches:
        parts = [_open_types(b) for b in branches]
        if any(p is None for p in parts) or any(_has_length_bounds(b) for b in branches):
            return None
        return frozenset().union(*parts)
    if "type" in keys and keys <= {"type", "minLength", "maxLength"}:
        return frozenset(_types(node))
    return None


def _has_length_bounds(node: Any) -> bool:
    if not isinstance(node, Mapping):
        return False
    return "minLength" in node or "maxLength" in node or any(_has_length_bounds(b) for b in node.get("anyOf") or [])


def _bounds(node: Mapping[str, Any], low_key: str, high_key: str) -> tuple[int, int | None]:
    """(low, high) of a pair of bounds; a value that is not an integer >= 0 is ignored (a strict tool
    never gets here with one: `check` refuses it)."""
    low, high = node.get(low_key), node.get(high_key)
    low = low if isinstance(low, int) and not isinstance(low, bool) and low >= 0 else 0
    high = high if isinstance(high, int) and not isinstance(high, bool) and high >= low else None
    return low, high


def _suffix(low: int, high: int | None) -> str:
    """The EBNF repetition of low..high (None: unbounded) copies."""
    if high is None:
        return "*" if low == 0 else f"{{{low},}}"
    return f"{{{low},{high}}}"


def _repeat(node: Mapping[str, Any], low_key: str, high_key: str) -> str:
    return _suffix(*_bounds(node, low_key, high_key))
