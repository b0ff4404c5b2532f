"""Chat prompt rendering: the model directory's jinja chat template, rendered as Hugging Face does.

Loading: `chat_template.jinja` in the model directory wins; otherwise `tokenizer_config.json`
"chat_template" (a string, or a list of {name, template} from which "default" is taken).

Rendering matches transformers' `apply_chat_template`: a jinja2 ImmutableSandboxedEnvironment with
trim_blocks, lstrip_blocks and the loopcontrols extension; `tojson` is `json.dumps` with
ensure_ascii=False by default; `raise_exception` and `strftime_now` globals; the variables
`messages`, `tools`, `add_generation_prompt`, the special tokens of tokenizer_config.json, and every
chat_template_kwargs entry (enable_thinking, clear_thinking, ...).

Messages are validated and normalised first (see `normalize_messages`), so templates only ever see
string content and tool-call arguments that are dicts. A request the template cannot render raises
`ChatTemplateError`, which names the message index and field (mapped to INVALID_ARGUMENT).
Torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from common.serving.model_files import read_json

ROLES = ("system", "user", "assistant", "tool")
RESERVED_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt"})
# tokenizer_config.json entries that transformers exposes to templates as variables.
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTemplateError(ValueError):
    """A request the chat template cannot render; `str()` names the offending message and field."""

    def __init__(self, message_index: int | None, field: str, reason: str) -> None:
        self.message_index = message_index
        self.field = field
        self.reason = reason
        where = field if message_index is None else f"messages[{message_index}].{field}".rstrip(".")
        super().__init__(f"{where}: {reason}")


def load_template_source(model_dir: Path) -> str:
    """The chat template text of a Hugging Face model directory."""
    model_dir = Path(model_dir)
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = read_json(model_dir / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if not isinstance(template, str) or not template:
        raise FileNotFoundError(
            f"no chat template in {model_dir}: expected chat_template.jinja or a 'chat_template' "
            "string (or a list with a 'default' entry) in tokenizer_config.json"
        )
    return template


class ChatTemplate:
    """A compiled chat template plus the special-token variables of its tokenizer."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.source = source
        self._template = env.from_string(source)  # a syntax error is a model-directory error: raise here
        self._special_tokens = dict(special_tokens or {})

    @classmethod
    def from_dir(cls, model_dir: Path) -> ChatTemplate:
        config = read_json(Path(model_dir) / "tokenizer_config.json")
        special = {k: _token_text(config[k]) for k in _SPECIAL_TOKEN_KEYS if config.get(k) is not None}
        return cls(load_template_source(model_dir), special)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """Validate, normalise and render a conversation into the prompt string."""
        kwargs = dict(chat_template_kwargs or {})
        reserved = sorted(RESERVED_VARIABLES.intersection(kwargs))
        if reserved:
            raise ChatTemplateError(None, f"chat_template_kwargs.{reserved[0]}", "is reserved and cannot be set")
        variables = {
            **self._special_tokens,
            **kwargs,
            "messages": normalize_messages(messages),
            "tools": _validate_tools(tools),
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._template.render(**variables)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(None, "messages", f"the chat template rejected the conversation: {exc}") from exc


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Check roles and fields; return copies with string content and dict tool-call arguments.

    - role is one of system/user/assistant/tool;
    - content is a string or a list of text parts (joined); it may be missing only on assistant
      messages (then "");
    - reasoning_content, when present, is a string;
    - assistant tool_calls: a list of {function: {name, arguments}}; arguments given as a JSON
      string are parsed and must be a JSON object (an empty string means no arguments).
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(None, "messages", "must be a list of messages")
    if not messages:
        raise ChatTemplateError(None, "messages", "must contain at least one message")
    return [_normalize_message(i, m) for i, m in enumerate(messages)]


def _normalize_message(index: int, message: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise ChatTemplateError(index, "", "must be an object with a role")
    role = message.get("role")
    if role not in ROLES:
        raise ChatTemplateError(index, "role", f"must be one of {', '.join(ROLES)}, got {role!r}")
    out = dict(message)
    out["content"] = _normalize_content(index, role, message.get("content"))
    reasoning = message.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        raise ChatTemplateError(index, "reasoning_content", "must be a string")
    tool_calls = message.get("tool_calls")
    if tool_calls is None:
        out.pop("tool_calls", None)
    elif role != "assistant":
        raise ChatTemplateError(index, "tool_calls", "is only allowed on assistant messages")
    elif isinstance(tool_calls, (str, bytes, Mapping)) or not isinstance(tool_calls, Sequence):
        raise ChatTemplateError(index, "tool_calls", "must be a list")
    else:
        out["tool_calls"] = [_normalize_tool_call(index, k, call) for k, call in enumerate(tool_calls)]
    return out


def _normalize_content(index: int, role: str, content: Any) -> str:
    if content is None:
        if role == "assistant":
            return ""
        raise ChatTemplateError(index, "content", f"is required on {role} messages")
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, bytes):
        texts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise ChatTemplateError(index, f"content[{j}]", "only text parts are supported")
        return "".join(texts)
    raise ChatTemplateError(index, "content", "must be a string or a list of text parts")


def _normalize_tool_call(index: int, k: int, call: Any) -> dict[str, Any]:
    field = f"tool_calls[{k}]"
    if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
        raise ChatTemplateError(index, f"{field}.function", "must be an object with name and arguments")
    function = dict(call["function"])
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ChatTemplateError(index, f"{field}.function.name", "must be a non-empty string")
    function["arguments"] = _parse_arguments(index, f"{field}.function.arguments", function.get("arguments"))
    return {**call, "function": function}


def _parse_arguments(index: int, field: str, arguments: Any) -> dict[str, Any]:
    if arguments is None:
        return {}
    if isinstance(arguments, Mapping):
        return dict(arguments)
    if not isinstance(arguments, str):
        raise ChatTemplateError(index, field, "must be a JSON object or a string holding one")
    if not arguments.strip():
        return {}
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError as exc:
        raise ChatTemplateError(index, field, f"must be valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise ChatTemplateError(index, field, "must be a JSON object")
    return parsed


def _validate_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[Mapping[str, Any]] | None:
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ChatTemplateError(None, "tools", "must be a list of tool objects")
    for j, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ChatTemplateError(None, f"tools[{j}]", "must be an object")
    return list(tools)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _token_text(token: Any) -> str:
    # tokenizer_config.json stores a special token either as text or as a serialised AddedToken.
    return token["content"] if isinstance(token, Mapping) else str(token)
