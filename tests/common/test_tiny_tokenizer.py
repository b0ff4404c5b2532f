"""common.tools.tiny_tokenizer: the tokenizer files of the tiny model directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from common.tools.tiny_tokenizer import (
    SPECIAL_TOKENS,
    STOP_TOKENS,
    chat_template_source,
    write_tokenizer_files,
)

FILES = ["chat_template.jinja", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize("template", ["glm45", "glm47"])
def test_files_are_complete_consistent_and_deterministic(tmp_path: Path, template: str):
    info = write_tokenizer_files(tmp_path / "a", template)
    again = write_tokenizer_files(tmp_path / "b", template)
    assert info == again
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == FILES
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    d = tmp_path / "a"
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    config = json.loads((d / "tokenizer_config.json").read_text())
    generation = json.loads((d / "generation_config.json").read_text())
    source = (d / "chat_template.jinja").read_text()
    assert source == config["chat_template"] == chat_template_source(template)
    assert config["eos_token"] == config["pad_token"] == "<|endoftext|>"
    assert generation["eos_token_id"] == info.eos_token_ids == [tok.token_to_id(t) for t in STOP_TOKENS]
    assert generation["pad_token_id"] == info.pad_token_id == tok.token_to_id("<|endoftext|>")
    assert info.vocab_size == tok.get_vocab_size(with_added_tokens=True)


def test_vocabulary_shape(tmp_path: Path):
    info = write_tokenizer_files(tmp_path, "glm45")
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    merges = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["merges"]
    assert 400 <= len(merges) <= 600
    added = tok.get_added_tokens_decoder()
    assert sorted(t.content for t in added.values()) == sorted(SPECIAL_TOKENS)
    assert all(t.special for t in added.values())
    assert max(added) == info.vocab_size - 1  # special tokens follow the learned vocabulary, as in GLM
    assert len(tok.encode("\n", add_special_tokens=False).ids) == 1
    # Multi-byte characters are split across tokens for some CJK and every emoji here.
    for text in ("龘", "😀", "天気"):
        pieces = [tok.decode([i]) for i in tok.encode(text, add_special_tokens=False).ids]
        assert any("\ufffd" in p for p in pieces), text


def test_unknown_template_is_rejected(tmp_path: Path):
    with pytest.raises(ValueError, match="glm45"):
        write_tokenizer_files(tmp_path, "glm5")  # type: ignore[arg-type]
