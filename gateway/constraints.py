"""Structured-output constraints of a public request: response_format, json_schema, regex, ebnf.

The gateway does not compile grammars (that needs the workers' grammar backend); it checks each
constraint's shape so that most mistakes are refused here, naming the public field: a JSON schema
must be a JSON object that its draft's meta-schema accepts (`jsonschema`), a regex must compile
under Python's `re` (the backend's dialect is close but not equal), an EBNF must define `root`, and
every source is at most MAX_SOURCE_CHARS characters. At most one constraint per request. What the
backend still refuses comes back from the worker as INVALID_ARGUMENT and is renamed to the public
field here (`worker_refusal`). docs/structured_output.md §API and tool calls.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import jsonschema
from jsonschema.exceptions import SchemaError

from common.serving import metrics
from common.serving.sampling_params import Grammar
from gateway.calls import ChatCall, Constraint
from gateway.errors import GatewayError, invalid
from gateway.tool_grammar import LAYOUTS, ToolGrammarError, tool_call_grammar, tool_call_structural_tag
from protos import worker_pb2

MAX_SOURCE_CHARS = 256 * 1024  # one constraint's source text (a schema as compact JSON)
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
_ROOT_RULE = re.compile(r"^\s*root\s*::=", re.MULTILINE)


def json_schema(value: Any, field: str) -> Constraint:
    """A JSON schema given as an object or as its JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise invalid(field, f"must be a JSON schema: not valid JSON ({e})") from None
    if not isinstance(value, Mapping):
        raise invalid(field, f"must be a JSON schema object, got {type(value).__name__}")
    try:
        validator = jsonschema.validators.validator_for(value, default=jsonschema.Draft202012Validator)
        validator.check_schema(value)
    except SchemaError as e:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.path)
        raise invalid(f"{field}{where}", f"is not a valid JSON schema: {e.message}") from None
    source = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return _made("json_schema", _bounded(source, field), field)


def regex(value: Any, field: str) -> Constraint:
    source = _text(value, field)
    try:
        re.compile(source)
    except re.error as e:
        raise invalid(field, f"is not a valid regular expression: {e}") from None
    return _made("regex", source, field)


def ebnf(value: Any, field: str) -> Constraint:
    source = _text(value, field)
    if not _ROOT_RULE.search(source):
        raise invalid(field, "must define the start rule `root ::= ...`")
    return _made("ebnf", source, field)


def response_format(value: Any, field: str = "response_format") -> Constraint | None:
    """OpenAI's response_format; None for {"type": "text"}."""
    if not isinstance(value, Mapping):
        raise invalid(field, 'must be an object such as {"type": "json_object"}')
    kind = value.get("type")
    if kind not in RESPONSE_FORMATS:
        raise invalid(f"{field}.type", f"must be one of {', '.join(RESPONSE_FORMATS)}, got {kind!r}")
    if kind == "text":
        return None
    if kind == "json_object":
        return _made("json_object", "", f"{field}.type")
    spec = value.get("json_schema")
    if not isinstance(spec, Mapping):
        raise invalid(f"{field}.json_schema", 'must be an object {"name": ..., "schema": {...}} with type "json_schema"')
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise invalid(f"{field}.json_schema.name", "must be a string")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid(f"{field}.json_schema.strict", "must be true or false")
    schema = spec.get("schema", spec.get("schema_"))
    if schema is None:
        raise invalid(f"{field}.json_schema.schema", "is required with type \"json_schema\"")
    return json_schema(schema, f"{field}.json_schema.schema")


def one(constraints: Sequence[Constraint | None]) -> Constraint | None:
    """The request's constraint: at most one of the fields may set one."""
    given = [c for c in constraints if c is not None]
    if len(given) > 1:
        a, b = given[0].field, given[1].field
        raise invalid(a, f"and {b} cannot both be set: a request takes at most one constraint "
                         f"(response_format, json_schema, regex or ebnf)")
    return given[0] if given else None


def check_with_tools(constraint: Constraint | None, tool_choice: str) -> None:
    """tool_choice required / named constrain the answer to tool calls themselves (tool_grammar.py);
    a second constraint on the same answer is refused rather than one silently winning."""
    if constraint is not None and tool_choice in ("required", "named"):
        raise invalid(constraint.field, "cannot be combined with tool_choice \"required\" or a named tool: "
                                        "the answer is then constrained to tool calls")


def tool_constraint(call: ChatCall, family: str | None) -> Constraint | None:
    """With a GLM tool-call parser (`family`): tool_choice "required" / a named tool make the answer
    GLM's tool-call text with schema-valid arguments (an EBNF); "auto" with a strict tool leaves the
    text free and holds each call the model opens to its tool's schema (a structural tag). A strict
    tool whose schema the grammar cannot enforce is refused, naming the keyword (tool_grammar.py)."""
    if family not in LAYOUTS or not call.tools or not call.parse_tools:
        return None
    try:
        if call.tool_choice in ("required", "named"):
            single = call.tool_choice == "named" or not call.parallel_tool_calls
            grammar = Grammar("ebnf", tool_call_grammar(call.tools, family, single=single))
        elif any(t["function"].get("strict") is True for t in call.tools):
            grammar = Grammar("structural_tag", tool_call_structural_tag(call.tools, family))
        else:
            return None
    except ToolGrammarError as e:
        name = call.tools[e.index or 0]["function"]["name"]
        raise invalid(f"tools[{name}].function.parameters{e.path}",
                      f"{e.problem} (strict tools are held to the grammar subset of docs/structured_output.md)"
                      ) from None
    return Constraint(grammar, None)


def check_applied(constraint: Constraint, last: worker_pb2.DecodeChunk | None,
                  prefill: worker_pb2.PrefillResult | None, answer_tokens: int, answer_known: bool) -> str:
    """A constrained answer must have been sampled under the grammar: the workers report it
    (PrefillResult.grammar_applied for the first token, DecodeChunk.grammar_tokens for the rest).
    Returns the outcome counted in glmserve_grammar_requests_total; answer tokens with no such report
    mean a worker dropped the constraint: INTERNAL, never a silently unconstrained answer.
    `answer_tokens` excludes the reasoning, which `answer_known` says could be counted."""
    if (last is not None and last.grammar_tokens) or (prefill is not None and prefill.grammar_applied):
        outcome = "applied"
    elif answer_tokens <= 0:
        outcome = "not_reached"  # the reasoning used every token: the grammar had nothing to constrain
    elif not answer_known:
        outcome = "unverified"   # thinking on without a reasoning parser: answer tokens are not counted
    else:
        outcome = "dropped"
    metrics.grammar_requests_total().labels(outcome).inc()
    if outcome == "dropped":
        raise GatewayError(grpc.StatusCode.INTERNAL,
                           f"the workers returned {answer_tokens} answer tokens without applying the "
                           f"{constraint.grammar.kind} constraint (a worker without grammar support?); "
                           f"the answer was withheld")
    return outcome


def worker_refusal(e: GatewayError, constraint: Constraint | None) -> GatewayError:
    """A worker's INVALID_ARGUMENT about the grammar -> the same, naming the public field. A tool-call
    grammar is built here, so the backend refusing one is the gateway's fault: INTERNAL."""
    if constraint is None or e.code != grpc.StatusCode.INVALID_ARGUMENT:
        return e
    detail = e.message
    if not any(word in detail for word in (constraint.grammar.kind, "grammar")):
        return e
    if constraint.field is None:
        return GatewayError(grpc.StatusCode.INTERNAL, f"the tool-call grammar was refused by the grammar backend: "
                                                      f"{detail}")
    return invalid(constraint.field, f"was refused by the grammar backend: {detail}")


def _made(kind: str, source: str, field: str) -> Constraint:
    return Constraint(Grammar(kind, source), field)  # sources are checked non-empty above


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise invalid(field, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise invalid(field, "must not be empty")
    return _bounded(value, field)


def _bounded(source: str, field: str) -> str:
    if len(source) > MAX_SOURCE_CHARS:
        raise invalid(field, f"is {len(source)} characters; at most {MAX_SOURCE_CHARS} are accepted")
    return source
