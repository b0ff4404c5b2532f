"""Chat template rendering through gateway/chat_template.py on directories from common.tools.tiny_tokenizer.

The expected strings are the rendered vectors of docs/parsers.md §2.3 (and the §2.1/§2.2 rules).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from common.tools.tiny_tokenizer import write_tokenizer_files
from gateway.chat_template import ChatTemplate, ChatTemplateError, load_template_source

HI = [{"role": "user", "content": "Hi"}]
HISTORY = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "<think>x</think>Hello!"},
    {"role": "user", "content": "Bye"},
]
OFF = {"enable_thinking": False}

VECTORS = {
    ("glm45", "hi", None): "[gMASK]<sop><|user|>\nHi<|assistant|>",
    ("glm45", "hi", "off"): "[gMASK]<sop><|user|>\nHi/nothink<|assistant|>\n<think></think>",
    ("glm47", "hi", None): "[gMASK]<sop><|user|>Hi<|assistant|><think>",
    ("glm47", "hi", "off"): "[gMASK]<sop><|user|>Hi<|assistant|></think>",
    ("glm45", "history", None):
        "[gMASK]<sop><|user|>\nHi<|assistant|>\n<think></think>\nHello!<|user|>\nBye<|assistant|>",
    ("glm47", "history", None): "[gMASK]<sop><|user|>Hi<|assistant|></think>Hello!<|user|>Bye<|assistant|><think>",
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "查询天气",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]},
    },
}
TOOL_ROUND_TRIP = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Beijing?"},
    {"role": "assistant", "content": None, "reasoning_content": "Need the tool.",
     "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "北京", "days": 2}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 25}'},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]
TOOLS_HEADER = ("<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n")
TOOLS_INSTRUCTIONS = {
    "glm45": "</tools>\n\nFor each function call, output the function name and arguments within the following "
             "XML format:\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}"
             "</arg_value>\n<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>",
    "glm47": "</tools>\n\nFor each function call, output the function name and arguments within the following "
             "XML format:\n<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}"
             "</arg_value><arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>...</tool_call>",
}
TOOL_ROUND_TRIP_TAIL = {
    "glm45": "<|system|>\nYou are helpful.<|user|>\nWeather in Beijing?<|assistant|>\n<think>Need the tool.</think>"
             "\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n<arg_key>days"
             "</arg_key>\n<arg_value>2</arg_value>\n</tool_call><|observation|>\n<tool_response>\n{\"temp\": 25}\n"
             "</tool_response>\n<tool_response>\nsunny\n</tool_response><|assistant|>",
    "glm47": "<|system|>You are helpful.<|user|>Weather in Beijing?<|assistant|><think>Need the tool.</think>"
             "<tool_call>get_weather<arg_key>city</arg_key><arg_value>北京</arg_value><arg_key>days</arg_key>"
             "<arg_value>2</arg_value></tool_call><|observation|><tool_response>{\"temp\": 25}</tool_response>"
             "<tool_response>sunny</tool_response><|assistant|><think>",
}


def tools_block(template: str, tools: list[dict]) -> str:
    lines = "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tools)
    return "[gMASK]<sop>" + TOOLS_HEADER + lines + TOOLS_INSTRUCTIONS[template]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dirs = {}
    for name in ("glm45", "glm47"):
        d = tmp_path_factory.mktemp(name)
        write_tokenizer_files(d, name)
        dirs[name] = d
    return dirs


@pytest.fixture(scope="module")
def templates(model_dirs: dict[str, Path]) -> dict[str, ChatTemplate]:
    return {name: ChatTemplate.from_dir(d) for name, d in model_dirs.items()}


@pytest.mark.parametrize(("template", "conversation", "thinking"), sorted(VECTORS, key=str))
def test_spec_vectors(templates, template, conversation, thinking):
    messages = HI if conversation == "hi" else HISTORY
    kwargs = OFF if thinking == "off" else None
    rendered = templates[template].render(messages, chat_template_kwargs=kwargs)
    assert rendered == VECTORS[(template, conversation, thinking)]


@pytest.mark.parametrize("template", ["glm45", "glm47"])
def test_tool_round_trip_vector(templates, template):
    rendered = templates[template].render(TOOL_ROUND_TRIP, [WEATHER_TOOL])
    assert rendered == tools_block(template, [WEATHER_TOOL]) + TOOL_ROUND_TRIP_TAIL[template]


@pytest.mark.parametrize("template", ["glm45", "glm47"])
def test_tools_block_serialises_each_whole_tool_object(templates, template):
    second = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}}
    rendered = templates[template].render(HI, [WEATHER_TOOL, second])
    assert rendered.startswith(tools_block(template, [WEATHER_TOOL, second]))
    assert '"description": "查询天气"' in rendered  # tojson keeps non-ASCII, default separators


@pytest.mark.parametrize("template", ["glm45", "glm47"])
def test_dict_and_json_string_arguments_render_alike(templates, template):
    args = {"city": "东京", "count": 3, "exact": True, "filters": {"a": [1, "ü"]}, "note": None}
    as_dict = [*HI, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": args}}]}]
    as_text = [*HI, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps(args)}}]}]
    rendered = templates[template].render(as_dict)
    assert rendered == templates[template].render(as_text)
    sep = "\n" if template == "glm45" else ""
    for key, raw in [("city", "东京"), ("count", "3"), ("exact", "true"), ("filters", '{"a": [1, "ü"]}'),
                     ("note", "null")]:
        assert f"<arg_key>{key}</arg_key>{sep}<arg_value>{raw}</arg_value>" in rendered


def test_glm45_multi_turn_tool_loop_keeps_reasoning_only_after_last_user(templates):
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "reasoning_content": "old thought"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "\n<think>\nnew thought\n</think>\n\nChecking.",
         "tool_calls": [{"function": {"name": "noop", "arguments": ""}}]},
        {"role": "tool", "content": "done"},
        {"role": "assistant", "content": "All set.", "reasoning_content": "  wrap up  "},
    ]
    rendered = templates["glm45"].render(messages, add_generation_prompt=False)
    assert rendered == (
        "[gMASK]<sop><|user|>\nQ1<|assistant|>\n<think></think>\nA1<|user|>\nQ2<|assistant|>\n<think>new thought"
        "</think>\nChecking.\n<tool_call>noop\n</tool_call><|observation|>\n<tool_response>\ndone\n"
        "</tool_response><|assistant|>\n<think>wrap up</think>\nAll set."
    )


def test_glm45_nothink_goes_on_every_user_turn_once(templates):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c /nothink"}]
    rendered = templates["glm45"].render(messages, chat_template_kwargs=OFF)
    assert rendered == ("[gMASK]<sop><|user|>\na/nothink<|assistant|>\n<think></think>\nb<|user|>\nc /nothink"
                        "<|assistant|>\n<think></think>")
    thinking_on = templates["glm45"].render(messages, chat_template_kwargs={"enable_thinking": True})
    assert thinking_on.count("/nothink") == 1  # only the user's own


def test_glm47_clear_thinking_false_keeps_history_reasoning(templates):
    cleared = templates["glm47"].render(HISTORY)
    kept = templates["glm47"].render(HISTORY, chat_template_kwargs={"clear_thinking": False})
    assert "<|assistant|></think>Hello!" in cleared
    assert kept == "[gMASK]<sop><|user|>Hi<|assistant|><think>x</think>Hello!<|user|>Bye<|assistant|><think>"


@pytest.mark.parametrize("template", ["glm45", "glm47"])
def test_text_parts_are_joined_and_missing_assistant_content_is_empty(templates, template):
    parts = [{"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]}]
    assert templates[template].render(parts) == templates[template].render(HI)
    no_content = [*HI, {"role": "assistant", "content": None}]
    assert "None" not in templates[template].render(no_content)


@pytest.mark.parametrize(
    ("messages", "index", "field"),
    [
        ([*HI, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}],
         1, "tool_calls[0].function.arguments"),
        ([*HI, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1, 2]"}}]}],
         1, "tool_calls[0].function.arguments"),
        ([*HI, {"role": "assistant", "tool_calls": [{"function": {"name": "", "arguments": "{}"}}]}],
         1, "tool_calls[0].function.name"),
        ([*HI, {"role": "assistant", "tool_calls": [{"type": "function"}]}], 1, "tool_calls[0].function"),
        ([*HI, {"role": "developer", "content": "x"}], 1, "role"),
        ([*HI, {"role": "assistant", "content": "ok"}, {"role": "tool"}], 2, "content"),
        ([{"role": "user", "content": "x", "tool_calls": []}], 0, "tool_calls"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], 0, "content[0]"),
        ([{"role": "assistant", "content": "x", "reasoning_content": 3}], 0, "reasoning_content"),
        ([HI[0], "not a message"], 1, ""),
    ],
)
def test_invalid_history_names_message_and_field(templates, messages, index, field):
    with pytest.raises(ChatTemplateError) as err:
        templates["glm45"].render(messages)
    assert (err.value.message_index, err.value.field) == (index, field)
    assert str(err.value).startswith(f"messages[{index}]" + (f".{field}:" if field else ":"))


def test_invalid_arguments_reason_matches_sglang_wording(templates):
    bad_json = [*HI, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}]
    not_object = [*HI, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "3"}}]}]
    with pytest.raises(ChatTemplateError, match="must be valid JSON"):
        templates["glm47"].render(bad_json)
    with pytest.raises(ChatTemplateError, match="must be a JSON object"):
        templates["glm47"].render(not_object)


def test_request_level_errors(templates):
    with pytest.raises(ChatTemplateError, match=r"^messages: must contain"):
        templates["glm45"].render([])
    with pytest.raises(ChatTemplateError, match=r"^tools\[0\]: must be an object"):
        templates["glm45"].render(HI, ["get_weather"])
    with pytest.raises(ChatTemplateError, match=r"^chat_template_kwargs\.messages: is reserved"):
        templates["glm45"].render(HI, chat_template_kwargs={"messages": []})


def test_template_raise_exception_becomes_chat_template_error():
    template = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        template.render(HI)


def test_render_does_not_mutate_the_request(templates):
    messages = [*HI, {"role": "assistant", "content": None,
                      "tool_calls": [{"function": {"name": "f", "arguments": '{"a": 1}'}}]}]
    before = json.dumps(messages)
    templates["glm45"].render(messages)
    assert json.dumps(messages) == before


def test_hf_environment_features():
    template = ChatTemplate(
        "{% for m in messages %}{% if loop.index0 == 1 %}{% break %}{% endif %}{{ m | tojson(indent=1) }}"
        "{% endfor %}|{{ eos_token }}|{{ custom }}\n  {% if true %}\n  x\n{% endif %}",
        {"eos_token": "<|endoftext|>"},
    )
    rendered = template.render([{"role": "user", "content": "é<"}, {"role": "user", "content": "2"}],
                               chat_template_kwargs={"custom": 7})
    # loopcontrols, tojson with ensure_ascii=False and indent, no HTML escaping,
    # special tokens and kwargs as variables, trim_blocks + lstrip_blocks
    assert rendered == '{\n "role": "user",\n "content": "é<"\n}|<|endoftext|>|7\n  x\n'


def test_tokenizer_config_only_loading_path(model_dirs, templates, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(model_dirs["glm47"], d)
    (d / "chat_template.jinja").unlink()
    assert ChatTemplate.from_dir(d).render(TOOL_ROUND_TRIP, [WEATHER_TOOL]) == \
        templates["glm47"].render(TOOL_ROUND_TRIP, [WEATHER_TOOL])

    config = json.loads((d / "tokenizer_config.json").read_text())
    source = config["chat_template"]
    config["chat_template"] = [{"name": "tool_use", "template": "wrong"}, {"name": "default", "template": source}]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_template_source(d) == source

    del config["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="no chat template"):
        load_template_source(d)


def test_chat_template_jinja_wins_over_tokenizer_config(model_dirs, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(model_dirs["glm45"], d)
    (d / "chat_template.jinja").write_text("from-file")
    assert ChatTemplate.from_dir(d).render(HI) == "from-file"


def test_templates_carry_the_markers_sglang_detects(templates):
    # docs/parsers.md §2.4: GLM family markers in both; the GLM-4.7 tool-call marker only in glm47.
    glm47_marker = re.compile(r"'<tool_call>'\s*[+~]\s*tc\.name")
    for name, template in templates.items():
        assert "[gMASK]<sop>" in template.source
        assert "enable_thinking is defined and not enable_thinking" in template.source
        assert bool(glm47_marker.search(template.source)) == (name == "glm47")
