"""Decoding of a raw `<arg_value>` text into a JSON value, by the argument's `ValueSpec`.

Rules (docs/parsers.md rule 4 and §3.2; SGLang's glm47 rules, used by both parsers):
* only strings admissible → the exact raw text (`123_456`, `007`, `true`, `null`, quotes and
  backslashes all kept);
* any JSON value admissible (undeclared argument, `{}` schema) → the JSON value if the text is valid
  JSON, else the raw text; no Python-literal evaluation, no unescaping;
* otherwise → JSON, else JSON after unescaping an over-escaped text (`[{\\"a\\": 1}]`); a JSON
  string payload becomes a number for number/integer (`"42"` → 42); `enum`/`const` values are
  matched by value first (`7` with enum ["7", 8] → "7"); when strings are admissible and the decoded
  value is a string or of a type the schema does not admit, the raw text is kept; when nothing
  decodes, the raw text is kept.
Non-finite numbers (`NaN`, `Infinity`, `1e999`) are not JSON and never decode.
"""

from __future__ import annotations

import json
import math
from typing import Any

from gateway.parsers.schema import ValueSpec, json_type

_FAIL = object()


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"non-finite number {text!r}")
    return value


def _reject_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def loads_strict(text: str, *, strict: bool = True) -> Any:
    """`json.loads` that rejects NaN/Infinity; returns `_FAIL` instead of raising."""
    try:
        return json.loads(text, strict=strict, parse_float=_finite_float, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return _FAIL


def _loads_unescaped(raw: str) -> Any:
    """Read `raw` as the body of a JSON string literal, then parse the result as JSON."""
    body = loads_strict('"' + raw + '"', strict=False)
    return _FAIL if not isinstance(body, str) else loads_strict(body)


def _admits(types: frozenset[str], value: Any) -> bool:
    kind = json_type(value)
    if kind in types:
        return True
    if kind == "integer" and "number" in types:
        return True
    return kind == "number" and "integer" in types and float(value).is_integer()


def _in_enum(value: Any, enum: tuple[Any, ...]) -> bool:
    return any(json_type(value) == json_type(item) and value == item for item in enum)


def _numeric_payload(value: Any, types: frozenset[str]) -> Any:
    """A JSON string that holds a number, for a number/integer argument, becomes that number."""
    if not isinstance(value, str) or "string" in types or not types & {"number", "integer"}:
        return value
    number = loads_strict(value)
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        return value
    if "number" not in types and not isinstance(number, int):
        return value
    return number


def decode_value(raw: str, spec: ValueSpec) -> Any:
    if spec.is_plain_string:
        return raw
    if spec.types is None and spec.enum is None:
        value = loads_strict(raw)
        return raw if value is _FAIL else value
    value = loads_strict(raw)
    if value is _FAIL:
        value = _loads_unescaped(raw)
    if value is not _FAIL and spec.types is not None:
        value = _numeric_payload(value, spec.types)
    if spec.enum is not None:
        if value is not _FAIL and _in_enum(value, spec.enum):
            return value
        if raw in spec.enum:
            return raw
    if value is _FAIL:
        return raw
    types = spec.types
    if types is None or "string" not in types:
        return value
    if isinstance(value, str) or not _admits(types, value):
        return raw
    return value
