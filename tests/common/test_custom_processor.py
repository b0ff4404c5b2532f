import collections
import json
import os
import pickle
import sys
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.serving.custom_processor import (
    BuiltinProcessor,
    CustomProcessorError,
    resolve_custom_processor,
)

# Glm4MoeThinkingBudgetLogitProcessor().to_str() with dill 0.4.1 / Python 3.11 (docs/parsers.md §5)
SGLANG_TO_STR = (
    '{"callable": "80049556000000000000008c2a73676c616e672e7372742e73616d706c696e672e637573746f6d5f6c6f6769745f'
    '70726f636573736f72948c23476c6d344d6f655468696e6b696e674275646765744c6f67697450726f636573736f729493942e"}'
)
MODULE = "sglang.srt.sampling.custom_logit_processor"
CLASS = "Glm4MoeThinkingBudgetLogitProcessor"


def _to_str(data: bytes) -> str:
    return json.dumps({"callable": data.hex()})


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    """Any attempt to unpickle during these tests fails the test."""

    def boom(*a, **k):
        raise AssertionError("pickle must never be executed")

    for name in ("loads", "load", "Unpickler", "_loads", "_load", "_Unpickler"):
        if hasattr(pickle, name):
            monkeypatch.setattr(pickle, name, boom)


def _install_module(name: str, monkeypatch) -> types.ModuleType:
    """Register a stand-in module (and its parent packages) so pickle.dumps can reference it."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    return sys.modules[name]


@pytest.fixture
def fake_sglang_module(monkeypatch):
    """A stand-in for SGLang's module so that pickle.dumps produces real class-by-reference streams."""
    mod = _install_module(MODULE, monkeypatch)
    mod.Glm4MoeThinkingBudgetLogitProcessor = type(CLASS, (), {"__module__": MODULE, "__qualname__": CLASS})
    mod.ThinkingBudgetLogitProcessor = type("ThinkingBudgetLogitProcessor", (), {"__module__": MODULE})
    return mod


def test_sglang_string_maps_to_builtin():
    assert resolve_custom_processor(SGLANG_TO_STR, enabled=True) is BuiltinProcessor.THINKING_BUDGET


def test_registered_names():
    for name in ("glm4_moe_thinking_budget", CLASS):
        assert resolve_custom_processor(name, enabled=True) is BuiltinProcessor.THINKING_BUDGET


def test_disabled_rejects_everything_with_the_flag_name():
    for value in (SGLANG_TO_STR, "glm4_moe_thinking_budget", "junk"):
        with pytest.raises(CustomProcessorError,
                           match="custom_logit_processor requires the server flag --enable-custom-logit-processor"):
            resolve_custom_processor(value, enabled=False)
    assert resolve_custom_processor(None, enabled=False) is None
    assert resolve_custom_processor("", enabled=False) is None


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_protocol_of_the_class_reference(fake_sglang_module, protocol):
    data = pickle.dumps(fake_sglang_module.Glm4MoeThinkingBudgetLogitProcessor, protocol=protocol)
    assert resolve_custom_processor(_to_str(data), enabled=True) is BuiltinProcessor.THINKING_BUDGET


def test_other_class_of_the_same_module_rejected(fake_sglang_module):
    data = pickle.dumps(fake_sglang_module.ThinkingBudgetLogitProcessor, protocol=4)
    with pytest.raises(CustomProcessorError, match="ThinkingBudgetLogitProcessor is not supported"):
        resolve_custom_processor(_to_str(data), enabled=True)


def test_same_name_other_module_rejected(monkeypatch):
    cls = type(CLASS, (), {"__module__": "evil.module", "__qualname__": CLASS})
    setattr(_install_module("evil.module", monkeypatch), CLASS, cls)
    data = pickle.dumps(cls, protocol=4)
    with pytest.raises(CustomProcessorError, match="evil.module"):
        resolve_custom_processor(_to_str(data), enabled=True)


def test_unrelated_class_rejected():
    with pytest.raises(CustomProcessorError, match="collections.OrderedDict is not supported"):
        resolve_custom_processor(_to_str(pickle.dumps(collections.OrderedDict)), enabled=True)


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_reduce_payload_rejected_and_never_run(tmp_path, protocol):
    target = tmp_path / "pwned"
    data = pickle.dumps(_Payload(target), protocol=protocol)
    assert b"system" in data
    with pytest.raises(CustomProcessorError, match="opcode .* is not allowed"):
        resolve_custom_processor(_to_str(data), enabled=True)
    assert not target.exists()


def test_instance_of_the_whitelisted_class_rejected(fake_sglang_module):
    obj = fake_sglang_module.Glm4MoeThinkingBudgetLogitProcessor()
    data = pickle.dumps(obj, protocol=4)  # STACK_GLOBAL + EMPTY_TUPLE + NEWOBJ + ...
    with pytest.raises(CustomProcessorError, match="not allowed"):
        resolve_custom_processor(_to_str(data), enabled=True)


def test_whitelisted_name_then_a_call_is_rejected():
    # GLOBAL of the allowed class, then an empty tuple and REDUCE: calling it is not a reference
    data = b"c" + MODULE.encode() + b"\n" + CLASS.encode() + b"\n)R."
    with pytest.raises(CustomProcessorError, match="EMPTY_TUPLE"):
        resolve_custom_processor(_to_str(data), enabled=True)


def test_extra_global_on_the_stack_rejected():
    good = b"c" + MODULE.encode() + b"\n" + CLASS.encode() + b"\n"
    data = b"cos\nsystem\n" + good + b"."
    with pytest.raises(CustomProcessorError, match="only a class reference"):
        resolve_custom_processor(_to_str(data), enabled=True)


@pytest.mark.parametrize(
    "value, message",
    [
        ("not json and not a name", "registered name"),
        ('{"callable": "zz"}', "not valid hex"),
        ('{"callable": 5}', "exactly"),
        ('{"callable": "80", "extra": 1}', "exactly"),
        ('["callable"]', "exactly"),
        (json.dumps({"callable": bytes.fromhex(json.loads(SGLANG_TO_STR)["callable"])[:-1].hex()}),
         "not a valid pickle|no STOP"),
        (json.dumps({"callable": (bytes.fromhex(json.loads(SGLANG_TO_STR)["callable"]) + b"N").hex()}),
         "after STOP"),
        (json.dumps({"callable": "00" * 5000}), "longer than"),
    ],
)
def test_malformed_values(value, message):
    with pytest.raises(CustomProcessorError, match=message):
        resolve_custom_processor(value, enabled=True)


_GOOD = bytes.fromhex(json.loads(SGLANG_TO_STR)["callable"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("rid"), st.integers(0, len(_GOOD)), st.integers(0, 255)), max_size=4))
def test_mutated_streams_only_resolve_or_raise_the_gate_error(edits):
    data = bytearray(_GOOD)
    for kind, pos, byte in edits:
        pos = min(pos, len(data) - 1) if data else 0
        if kind == "r" and data:
            data[pos] = byte
        elif kind == "i":
            data.insert(pos, byte)
        elif data:
            del data[pos]
    try:
        got = resolve_custom_processor(_to_str(bytes(data)), enabled=True)
    except CustomProcessorError:
        return
    assert got is BuiltinProcessor.THINKING_BUDGET
