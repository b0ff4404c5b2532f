"""Tokenizer, IncrementalDetokenizer and StopStringMatcher on the tiny byte-level BPE tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.tools.tiny_tokenizer import SPECIAL_TOKENS, STOP_TOKENS, write_tokenizer_files
from gateway.chat_template import ChatTemplate
from gateway.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer, TokenizerError

FFFD = "\ufffd"
MULTILINGUAL = [
    "Hello, world! The weather in Beijing is sunny.",
    "北京今天的天气很好，我们去公园散步吧。龘靐齉",
    "こんにちは、世界！東京の天気を教えてください。",
    "Emoji 😀🎉🚀👍🏽❤️🇨🇳 and ZWJ 👨‍👩‍👧‍👦 done",
    "<think>先想一想 🤔</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>",
    "def f(x):\n    return {\"ключ\": x}  # ünïcödé\n",
]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("glm45")
    write_tokenizer_files(d, "glm45")
    return d


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


def stream(tok: Tokenizer, ids: list[int], sizes: list[int], **kwargs) -> list[str]:
    """Feed `ids` in groups of the given sizes (cycled); return every delta, finish() last."""
    det = IncrementalDetokenizer(tok, **{"skip_special_tokens": False, **kwargs})
    deltas, i, k = [], 0, 0
    while i < len(ids):
        n = sizes[k % len(sizes)] if sizes else 1
        deltas.append(det.feed(ids[i:i + n]))
        i, k = i + n, k + 1
    deltas.append(det.finish())
    return deltas


# --- Tokenizer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


@given(st.text(max_size=80))
@SETTINGS
def test_round_trip_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_single_special_ids(tok):
    ids = [tok.token_id(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    for text, token_id in zip(SPECIAL_TOKENS, ids):
        assert tok.encode(text) == [token_id]
        assert token_id in tok.special_ids
        assert tok.decode([token_id]) == text
    assert tok.special_ids == frozenset(ids)


def test_newline_is_one_token(tok):
    newline = tok.token_id("\n")
    assert tok.encode("\n") == [newline]
    assert tok.decode([newline]) == "\n"
    assert newline not in tok.special_ids


def test_token_id_of_a_missing_token_names_it(tok):
    with pytest.raises(TokenizerError, match="<no_such_token>"):
        tok.token_id("<no_such_token>")


def test_encode_adds_no_special_tokens_and_template_markers_stay_whole(tok, model_dir):
    prompt = ChatTemplate.from_dir(model_dir).render([{"role": "user", "content": "Hi 北京"}])
    ids = tok.encode(prompt)
    gmask, sop, user, assistant = (tok.token_id(t) for t in ("[gMASK]", "<sop>", "<|user|>", "<|assistant|>"))
    assert ids[:3] == [gmask, sop, user]
    assert ids[-1] == assistant
    assert tok.decode(ids) == prompt


def test_decode_skip_special_tokens_with_keep(tok):
    ids = tok.encode("<|assistant|><think>a</think>b<tool_call>c<|user|>")
    assert tok.decode(ids, skip_special_tokens=True) == "abc"
    assert tok.decode(ids, skip_special_tokens=True, keep=["<think>", "</think>"]) == "<think>a</think>bc"
    assert tok.decode(ids) == "<|assistant|><think>a</think>b<tool_call>c<|user|>"


def test_eos_ids_from_generation_config(tok):
    assert tok.eos_token_ids == tuple(tok.token_id(t) for t in STOP_TOKENS)


def test_eos_ids_fallbacks(model_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == (5,)
    (tmp_path / "config.json").unlink()
    eos = Tokenizer.from_dir(tmp_path)
    assert eos.eos_token_ids == (eos.token_id("<|endoftext|>"),)  # tokenizer_config eos_token
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 8]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == (7, 8)  # generation_config wins


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


# --- IncrementalDetokenizer --------------------------------------------------------------------


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_incremental_one_token_at_a_time(tok, text):
    ids = tok.encode(text)
    assert len(ids) < len(text.encode())  # merges happen...
    assert any(FFFD in tok.decode([i]) for i in ids) or text.isascii()  # ...and characters split
    deltas = stream(tok, ids, [1])
    assert "".join(deltas) == text
    assert not any(FFFD in d for d in deltas)


@given(st.text(max_size=60), st.lists(st.integers(1, 5), min_size=1, max_size=8))
@SETTINGS
def test_incremental_text_in_random_groups(tok, text, sizes):
    ids = tok.encode(text)
    deltas = stream(tok, ids, sizes)
    assert "".join(deltas) == text
    assert not any(FFFD in d for d in deltas) or FFFD in text


@given(st.data(), st.lists(st.integers(1, 5), min_size=1, max_size=8), st.booleans())
@SETTINGS
def test_incremental_random_ids_equal_full_decode(tok, data, sizes, skip):
    # Random ids are random byte soup: incomplete and invalid UTF-8 everywhere.
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=60))
    full = tok.decode(ids, skip_special_tokens=skip)
    deltas = stream(tok, ids, sizes, skip_special_tokens=skip)
    assert "".join(deltas) == full
    if FFFD not in full:
        assert not any(FFFD in d for d in deltas)


def test_incremental_with_prompt_context_and_keep(tok):
    prompt = tok.encode("[gMASK]<sop><|user|>\n你好<|assistant|>")
    output = tok.encode("<think>想一想</think>答案是 42 🎉<tool_call>f<|observation|>")
    keep = ["<think>", "</think>", "<tool_call>"]
    rng = random.Random(0)
    for _ in range(20):
        det = IncrementalDetokenizer(tok, prompt, skip_special_tokens=True, keep=keep)
        deltas, i = [], 0
        while i < len(output):
            n = rng.randint(1, 3)
            deltas.append(det.feed(output[i:i + n]))
            i += n
        text = "".join(deltas) + det.finish()
        assert text == "<think>想一想</think>答案是 42 🎉<tool_call>f"
        assert text == tok.decode(output, skip_special_tokens=True, keep=keep)


def test_incremental_holds_an_incomplete_character_until_finish(tok):
    byte_tokens = [i for i in range(tok.vocab_size) if tok.decode([i]) == FFFD]
    lead = next(i for i in byte_tokens if tok.decode([i, i]) == FFFD * 2)  # a lone lead/continuation byte
    det = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert det.feed(tok.encode("ok")) == "ok"
    assert det.feed([lead]) == ""
    assert det.finish() == FFFD


def test_incremental_window_stays_small_on_invalid_bytes(tok, monkeypatch):
    # A stream that never forms a character must not make each step decode the whole history.
    byte_tokens = [i for i in range(tok.vocab_size) if tok.decode([i]) == FFFD]
    garbage = [byte_tokens[k % len(byte_tokens)] for k in range(400)]
    widths = []
    raw_decode = Tokenizer._raw_decode
    monkeypatch.setattr(Tokenizer, "_raw_decode", lambda self, ids: widths.append(len(ids)) or raw_decode(self, ids))
    deltas = stream(tok, garbage, [1])
    assert "".join(deltas) == tok.decode(garbage)
    assert max(widths[:-1]) <= 16  # finish() may decode whatever is still held, nothing else grows


# --- StopStringMatcher -------------------------------------------------------------------------


def stop_one_shot(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Reference: cut at the first position where some stop string ends (the longest if several)."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            stop = max(ending, key=len)
            return text[:end - len(stop)], stop
    return text, None


def stop_stream(chunks: list[str], stops: list[str]) -> tuple[list[str], str | None]:
    matcher = StopStringMatcher(stops)
    out, matched = [], None
    for chunk in chunks:
        emitted, stop = matcher.feed(chunk)
        out.append(emitted)
        matched = matched or stop
    out.append(matcher.finish())
    return out, matched


def test_stop_split_across_deltas_is_never_emitted():
    out, matched = stop_stream(["Hello <", "|st", "op", "|> tail", " more"], ["<|stop|>"])
    assert out == ["Hello ", "", "", "", "", ""]
    assert matched == "<|stop|>"


def test_false_start_is_released():
    out, matched = stop_stream(["a <|s", "x done"], ["<|stop|>"])
    assert "".join(out) == "a <|sx done" and out[0] == "a " and matched is None


def test_overlapping_prefixes():
    # "abc" completes before "bcd"; "ab" and "abc" start together: the first to complete wins.
    assert stop_stream(["xa", "bcd"], ["bcd", "abc"]) == (["x", "", ""], "abc")
    assert stop_stream(["xa", "b", "c"], ["abc", "ab"]) == (["x", "", "", ""], "ab")
    assert stop_stream(["aab", "x"], ["abx"]) == (["a", "", ""], "abx")


def test_held_text_is_flushed_by_finish_and_nothing_follows_a_match():
    matcher = StopStringMatcher(["</s>", "END"])
    assert matcher.feed("value EN") == ("value ", None)
    assert matcher.finish() == "EN"
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("aENDb") == ("a", "END")
    assert matcher.feed("more") == ("", None)
    assert matcher.finish() == ""
    assert matcher.matched == "END"


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])


@given(
    st.text(alphabet="abc<|>", max_size=40),
    st.lists(st.text(alphabet="abc<|>", min_size=1, max_size=4), min_size=1, max_size=3),
    st.lists(st.integers(1, 6), min_size=1, max_size=8),
)
@settings(max_examples=300, deadline=None)
def test_stop_matcher_stream_equals_one_shot(text, stops, sizes):
    chunks, i, k = [], 0, 0
    while i < len(text):
        chunks.append(text[i:i + sizes[k % len(sizes)]])
        i, k = i + sizes[k % len(sizes)], k + 1
    out, matched = stop_stream(chunks, stops)
    assert ("".join(out), matched) == stop_one_shot(text, stops)
