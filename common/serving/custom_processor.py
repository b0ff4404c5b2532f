"""The `custom_logit_processor` request field (docs/parsers.md rule 8).

A request may name a built-in processor, or send what SGLang clients send:
`Glm4MoeThinkingBudgetLogitProcessor().to_str()`, i.e. JSON `{"callable": HEX}` where HEX is a
pickle of the class *by reference*. That string is never unpickled. Its opcodes are read with
`pickletools.genops` (which only parses) and run on a symbolic stack that knows strings, memo
slots and global references and nothing else; the stream is accepted only if it does nothing but
name one whitelisted global (module + qualified name). Any opcode that could call, build or
import something else (REDUCE, BUILD, INST, OBJ, NEWOBJ, EXT*, PERSID, ...) is refused by name.

Torch-free: the gateway may call it during request conversion; errors map to INVALID_ARGUMENT.

Clients without sglang installed use `Glm4MoeThinkingBudgetLogitProcessor` below in place of
SGLang's class: `to_str()` gives the very string SGLang's does, so the same client code works
against SGLang servers and glmserve.
"""

from __future__ import annotations

import binascii
import enum
import json
import pickletools
from dataclasses import dataclass

FLAG = "--enable-custom-logit-processor"
MAX_PICKLE_BYTES = 4096  # a class reference is ~100 bytes; bound the parsing work


class CustomProcessorError(ValueError):
    """The request's custom_logit_processor cannot be used (maps to INVALID_ARGUMENT)."""


class BuiltinProcessor(enum.Enum):
    THINKING_BUDGET = "glm4_moe_thinking_budget"  # reads custom_params["thinking_budget"]


# (module, qualified name) of SGLang classes that map to a built-in processor.
_PICKLED_CLASSES: dict[tuple[str, str], BuiltinProcessor] = {
    ("sglang.srt.sampling.custom_logit_processor", "Glm4MoeThinkingBudgetLogitProcessor"):
        BuiltinProcessor.THINKING_BUDGET,
}
_NAMES: dict[str, BuiltinProcessor] = {
    "glm4_moe_thinking_budget": BuiltinProcessor.THINKING_BUDGET,
    "Glm4MoeThinkingBudgetLogitProcessor": BuiltinProcessor.THINKING_BUDGET,
}


def resolve_custom_processor(value: str | None, enabled: bool) -> BuiltinProcessor | None:
    """Map the request field to a built-in processor; None when the field is unset/empty."""
    if not value:
        return None
    if not enabled:
        raise CustomProcessorError(f"custom_logit_processor requires the server flag {FLAG}")
    if value in _NAMES:
        return _NAMES[value]
    return _from_sglang_string(value)


def _from_sglang_string(value: str) -> BuiltinProcessor:
    try:
        obj = json.loads(value)
    except ValueError:
        raise CustomProcessorError(
            "custom_logit_processor must be a registered name "
            f"({', '.join(sorted(_NAMES))}) or SGLang's to_str() JSON {{\"callable\": HEX}}"
        ) from None
    if not isinstance(obj, dict) or set(obj) != {"callable"} or not isinstance(obj["callable"], str):
        raise CustomProcessorError('custom_logit_processor JSON must be exactly {"callable": "<hex>"}')
    hex_text = obj["callable"]
    if len(hex_text) > 2 * MAX_PICKLE_BYTES:
        raise CustomProcessorError(f"custom_logit_processor callable is longer than {MAX_PICKLE_BYTES} bytes")
    try:
        data = binascii.unhexlify(hex_text)
    except (binascii.Error, ValueError):
        raise CustomProcessorError("custom_logit_processor callable is not valid hex") from None
    module, name = read_pickled_global(data)
    try:
        return _PICKLED_CLASSES[(module, name)]
    except KeyError:
        raise CustomProcessorError(
            f"custom_logit_processor {module}.{name} is not supported; supported: "
            + ", ".join(f"{m}.{n}" for m, n in _PICKLED_CLASSES)
        ) from None


class Glm4MoeThinkingBudgetLogitProcessor:
    """Client-side stand-in for `sglang.srt.sampling.custom_logit_processor.Glm4MoeThinkingBudgetLogitProcessor`:

        extra_body={"custom_logit_processor": Glm4MoeThinkingBudgetLogitProcessor().to_str(),
                    "custom_params": {"thinking_budget": 512}}

    `to_str()` is SGLang's serialisation of its class (a pickle protocol 4 reference to it, as dill
    writes it), which an SGLang server unpickles to its own processor and glmserve recognises without
    unpickling. Nothing here runs on the server."""

    MODULE = "sglang.srt.sampling.custom_logit_processor"
    NAME = "Glm4MoeThinkingBudgetLogitProcessor"

    @classmethod
    def to_str(cls) -> str:
        module, name = cls.MODULE.encode(), cls.NAME.encode()
        body = (b"\x8c" + bytes([len(module)]) + module + b"\x94" + b"\x8c" + bytes([len(name)]) + name
                + b"\x94\x93\x94.")  # SHORT_BINUNICODE, MEMOIZE, ..., STACK_GLOBAL, MEMOIZE, STOP
        frame = b"\x95" + len(body).to_bytes(8, "little")
        return json.dumps({"callable": (b"\x80\x04" + frame + body).hex()})


@dataclass(frozen=True)
class _Global:
    module: str
    name: str


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}
_MEMO_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}


def read_pickled_global(data: bytes) -> tuple[str, str]:
    """(module, name) of a pickle that only references one global; never executes anything.

    Accepted opcodes: PROTO, FRAME, unicode string pushes, memo put/get, GLOBAL, STACK_GLOBAL, STOP.
    The stream must end at its STOP and leave exactly one global reference on the stack.
    """
    stack: list[str | _Global] = []
    memo: dict[int, str | _Global] = {}
    try:
        for op, arg, pos in pickletools.genops(data):
            name = op.name
            if name == "PROTO":
                if not isinstance(arg, int) or not 0 <= arg <= 5:
                    raise CustomProcessorError(f"custom_logit_processor pickle has bad protocol {arg!r}")
            elif name == "FRAME":
                pass
            elif name in _STRING_OPS:
                stack.append(arg)
            elif name == "MEMOIZE":
                _need(stack, 1, name)
                memo[len(memo)] = stack[-1]
            elif name in _MEMO_PUT_OPS:
                _need(stack, 1, name)
                memo[int(arg)] = stack[-1]
            elif name in _MEMO_GET_OPS:
                if int(arg) not in memo:
                    raise CustomProcessorError(f"custom_logit_processor pickle reads an unset memo slot ({name})")
                stack.append(memo[int(arg)])
            elif name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                stack.append(_Global(module, attr))
            elif name == "STACK_GLOBAL":
                _need(stack, 2, name)
                attr, module = stack.pop(), stack.pop()
                if not isinstance(module, str) or not isinstance(attr, str):
                    raise CustomProcessorError("custom_logit_processor pickle: STACK_GLOBAL needs two strings")
                stack.append(_Global(module, attr))
            elif name == "STOP":
                if pos + 1 != len(data):
                    raise CustomProcessorError("custom_logit_processor pickle has bytes after STOP")
                if len(stack) != 1 or not isinstance(stack[0], _Global):
                    raise CustomProcessorError(
                        "custom_logit_processor pickle must contain only a class reference"
                    )
                return stack[0].module, stack[0].name
            else:
                raise CustomProcessorError(
                    f"custom_logit_processor pickle uses opcode {name}, which is not allowed "
                    "(only a class reference is accepted)"
                )
    except CustomProcessorError:
        raise
    except (ValueError, EOFError) as exc:  # genops: truncated / malformed stream
        raise CustomProcessorError(f"custom_logit_processor callable is not a valid pickle: {exc}") from None
    raise CustomProcessorError("custom_logit_processor pickle has no STOP opcode")


def _need(stack: list, n: int, op: str) -> None:
    if len(stack) < n:
        raise CustomProcessorError(f"custom_logit_processor pickle: {op} on a short stack")
