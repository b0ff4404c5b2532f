"""Admissible JSON types of tool arguments, read from the request's tool schemas.

GLM writes argument values as raw text (strings unquoted, everything else as JSON text), so the
type of a value comes from the tool's JSON schema. Both GLM parsers use the set-based lookup of
docs/parsers.md §3.3 (SGLang's glm47 rules): local `$ref` (with `~0`/`~1` escapes, cycle-safe), `const`,
`enum`, `type` (string or list), `anyOf`/`oneOf` (union), `allOf` (intersection), `nullable`,
`properties` → object, `items` → array; anything else admits every JSON value. Properties come
from the top-level `properties` merged with those of top-level `anyOf`/`oneOf`/`allOf` branches
(a key in several places admits the union). Sibling-argument discriminators are not used.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

JSON_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    return "object"


@dataclass(frozen=True)
class ValueSpec:
    """What an argument may hold: `types` None admits any JSON value; `enum` lists allowed values."""

    types: frozenset[str] | None = None
    enum: tuple[Any, ...] | None = None

    @property
    def is_plain_string(self) -> bool:
        """Only strings are admissible: the value is the exact raw text (and can stream as such)."""
        return self.types == frozenset({"string"}) and (
            self.enum is None or all(isinstance(v, str) for v in self.enum)
        )


ANY = ValueSpec()


def _union(specs: list[ValueSpec]) -> ValueSpec:
    if not specs:
        return ANY
    types: frozenset[str] | None = frozenset()
    for spec in specs:
        types = None if (types is None or spec.types is None) else types | spec.types
    enum = None
    if all(spec.enum is not None for spec in specs):
        enum = tuple(v for spec in specs for v in spec.enum or ())
    return ValueSpec(types, enum)


def _intersect(specs: list[ValueSpec]) -> ValueSpec:
    types: frozenset[str] | None = None
    for spec in specs:
        if spec.types is None:
            continue
        if types is None:
            types = spec.types
            continue
        both = set(types & spec.types)
        if "integer" in types | spec.types and "number" in types | spec.types:
            both.add("integer")  # number admits integers
        types = frozenset(both)
    enum = next((spec.enum for spec in specs if spec.enum is not None), None)
    return ValueSpec(types or None, enum)


class _Resolver:
    def __init__(self, root: Any) -> None:
        self._root = root

    def resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return None
        node = self._root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node

    def deref(self, node: Any, seen: frozenset[str]) -> tuple[Any, frozenset[str]]:
        while isinstance(node, dict) and isinstance(node.get("$ref"), str):
            ref = node["$ref"]
            if ref in seen:
                return None, seen
            seen = seen | {ref}
            node = self.resolve(ref)
        return node, seen

    def spec(self, node: Any, seen: frozenset[str] = frozenset()) -> ValueSpec:
        node, seen = self.deref(node, seen)
        if not isinstance(node, dict):
            return ANY
        if "const" in node:
            return ValueSpec(frozenset({json_type(node["const"])}), (node["const"],))
        if isinstance(node.get("enum"), list) and node["enum"]:
            values = tuple(node["enum"])
            return ValueSpec(frozenset(json_type(v) for v in values), values)
        declared = node.get("type")
        names = [declared] if isinstance(declared, str) else declared if isinstance(declared, list) else []
        types = {t for t in names if t in JSON_TYPES}
        if types:
            if node.get("nullable") is True:
                types.add("null")
            return ValueSpec(frozenset(types))
        for key in ("anyOf", "oneOf"):
            if isinstance(node.get(key), list):
                return _union([self.spec(branch, seen) for branch in node[key]])
        if isinstance(node.get("allOf"), list):
            return _intersect([self.spec(branch, seen) for branch in node["allOf"]])
        if "properties" in node:
            return ValueSpec(frozenset({"object"}))
        if "items" in node:
            return ValueSpec(frozenset({"array"}))
        return ANY

    def properties(self, node: Any, seen: frozenset[str] = frozenset()) -> dict[str, list[Any]]:
        """Property schemas of an object schema, merged over its top-level combinator branches."""
        node, seen = self.deref(node, seen)
        found: dict[str, list[Any]] = {}
        if not isinstance(node, dict):
            return found
        if isinstance(node.get("properties"), dict):
            for key, sub in node["properties"].items():
                found.setdefault(key, []).append(sub)
        for combinator in ("anyOf", "oneOf", "allOf"):
            branches = node.get(combinator)
            for branch in branches if isinstance(branches, list) else ():
                for key, subs in self.properties(branch, seen).items():
                    found.setdefault(key, []).extend(subs)
        return found


class ToolSchemas:
    """Declared tool names and the `ValueSpec` of each of their arguments."""

    def __init__(self, tools: Iterable[dict] | None) -> None:
        self._specs: dict[str, dict[str, ValueSpec]] = {}
        for i, tool in enumerate(tools or ()):
            function = tool.get("function", tool) if isinstance(tool, dict) else None
            name = function.get("name") if isinstance(function, dict) else None
            if not isinstance(name, str) or not name:
                raise ValueError(f"tools[{i}] has no function name")
            parameters = function.get("parameters") or {}
            resolver = _Resolver(parameters)
            self._specs[name] = {
                key: _union([resolver.spec(sub) for sub in subs])
                for key, subs in resolver.properties(parameters).items()
            }
        self.names = frozenset(self._specs)

    def spec(self, tool: str, key: str) -> ValueSpec:
        """Spec of `tool`'s argument `key`; an undeclared key admits any JSON value."""
        return self._specs.get(tool, {}).get(key, ANY)

    def could_be_name(self, text: str) -> bool:
        """Whether `text` (the start of a call's name region) can still become a declared name."""
        head = text.lstrip()
        for name in self.names:
            if name.startswith(head) or (head.startswith(name) and not head[len(name) :].strip()):
                return True
        return False
