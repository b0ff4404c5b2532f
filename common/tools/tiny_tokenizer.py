"""A small byte-level BPE tokenizer with every GLM-4.x special token, for tests and the tiny model.

`write_tokenizer_files(out_dir, template)` writes the tokenizer half of a Hugging Face model
directory: tokenizer.json, tokenizer_config.json (with the chat template inline), chat_template.jinja
and generation_config.json. The BPE is trained on the embedded corpus below (English, code, JSON,
Chinese, Japanese, emoji), so multi-byte UTF-8 characters are often split across tokens, which is
what the incremental detokenizer has to survive. The special tokens are added after the learned
vocabulary, in the order of docs/parsers.md §1; their ids are ours, not GLM's, so callers look
every id up by text. Torch-free. Same inputs → byte-identical files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

TemplateName = Literal["glm45", "glm47"]

# docs/parsers.md §1, in GLM's id order.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    "<|begin_of_audio|>", "<|end_of_audio|>", "<|begin_of_transcription|>", "<|end_of_transcription|>",
    "<|code_prefix|>", "<|code_middle|>", "<|code_suffix|>",
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
    "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "/nothink",
    "<|begin_of_box|>", "<|end_of_box|>", "<|image|>", "<|video|>",
)
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|endoftext|>"
# generation_config.json eos_token_id, as GLM ships it: end of text, user turn, tool observation.
STOP_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|user|>", "<|observation|>")

BPE_VOCAB_SIZE = 768  # 256 byte symbols + ~512 merges, before the special tokens

_CORPUS = r"""
The quick brown fox jumps over the lazy dog. The weather in Beijing is sunny today.
Let me think about this step by step. First, I need to check the weather for the city.
I'll call the tool to get the current temperature, then answer the user's question.
You are a helpful assistant. Please answer the question as accurately as possible.
The answer is 42. Hello! How can I help you today? Thanks, that is all for now.
Paris, Tokyo, London, Shanghai, San Francisco and New York are large cities.
def get_weather(city: str, days: int = 1) -> dict:
    '''Return the forecast for a city.'''
    if days <= 0:
        raise ValueError("days must be positive")
    return {"city": city, "days": days, "temp": 25.5, "unit": "celsius"}

for i in range(10):
    print(f"step {i}: value={i * 2}")

class Request:
    def __init__(self, prompt_ids: list[int], max_tokens: int) -> None:
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens
{"type": "function", "function": {"name": "get_weather", "description": "Get the weather",
 "parameters": {"type": "object", "properties": {"city": {"type": "string"},
 "date": {"type": "string"}, "count": {"type": "number"}}, "required": ["city"]}}}
{"temp": 25, "condition": "sunny", "humidity": 0.61, "wind": null, "ok": true, "list": [1, 2, 3]}
get_weather city date count filters query search noop create_task title location arguments
今天北京的天气很好，我们去公园散步吧。请问明天上海会下雨吗？
我需要先调用工具查询天气，然后再回答用户的问题。这是一个简单的测试。
人工智能和大型语言模型正在改变世界。中文、英文和日文都可以处理。
北京 上海 广州 深圳 天气 温度 晴天 下雨 你好 谢谢 问题 回答
こんにちは、世界！今日はいい天気ですね。東京の天気を教えてください。
私は学生です。日本語を勉強しています。ありがとうございます。
カタカナ、ひらがな、漢字を使います。コーヒーを飲みましょう。
Emoji time 😀 🎉 🚀 👍 ❤️ 🔥 ✨ 🌏 🇨🇳 🇯🇵 — great job! 😀😀 🎉🎉
Mixed: café naïve résumé Ωmega ß über — “quotes” and ‘single’ … 100% ✓ ✗ → ←
Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024-06-27 3.14159 -7 1e10 0x1F
Markdown: # Title\n## Section\n- item one\n- item two\n```python\nx = 1\n```
"""


@dataclass(frozen=True)
class TokenizerInfo:
    vocab_size: int  # learned vocabulary + special tokens
    eos_token_ids: list[int]  # ids of STOP_TOKENS, the generation_config eos_token_id
    pad_token_id: int


def chat_template_source(template: TemplateName) -> str:
    """The package's own GLM-4.5/4.6 ("glm45") or GLM-4.7 ("glm47") chat template."""
    if template not in ("glm45", "glm47"):
        raise ValueError(f"template must be 'glm45' or 'glm47', got {template!r}")
    return (resources.files("common.tools") / "chat_templates" / f"{template}.jinja").read_text(encoding="utf-8")


def build_tokenizer() -> Tokenizer:
    """Train the byte-level BPE on the embedded corpus and append the GLM special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, single_word=False, lstrip=False, rstrip=False)
         for t in SPECIAL_TOKENS]
    )
    return tokenizer


def write_tokenizer_files(out_dir: Path, template: TemplateName) -> TokenizerInfo:
    """Write tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json."""
    source = chat_template_source(template)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=True)

    def tid(text: str) -> int:
        token_id = tokenizer.token_to_id(text)
        assert token_id is not None, text
        return token_id

    info = TokenizerInfo(
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        eos_token_ids=[tid(t) for t in STOP_TOKENS],
        pad_token_id=tid(PAD_TOKEN),
    )
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "chat_template": source,
    }
    generation_config = {"eos_token_id": info.eos_token_ids, "pad_token_id": info.pad_token_id}
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / "generation_config.json", generation_config)
    (out_dir / "chat_template.jinja").write_text(source, encoding="utf-8")
    return info


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
