"""Tokenizer loading, incremental detokenization and stop strings for the gateway. Torch-free.

- `Tokenizer.from_dir(model_dir)` wraps the model directory's `tokenizer.json`; encoding adds no
  special tokens (the chat template already starts with `[gMASK]<sop>`); token ids are looked up by
  text (`token_id`), stop ids come from generation_config.json.
- `IncrementalDetokenizer` turns a stream of token ids into text deltas whose concatenation equals
  the one-shot decode, never emitting half of a multi-byte UTF-8 character.
- `StopStringMatcher` holds back text that may be the start of a stop string and cuts the stream at
  the first stop string; stop strings are never emitted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers

from common.serving.model_files import eos_token_ids

REPLACEMENT_CHAR = "\ufffd"  # what a lossy UTF-8 decode yields for incomplete or invalid bytes


class TokenizerError(ValueError):
    """A tokenizer file or lookup that the gateway cannot use; the message says which."""


class Tokenizer:
    """A Hugging Face fast tokenizer plus the ids the serving path needs."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)
        self.special_ids: frozenset[int] = frozenset(
            i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special
        )

    @classmethod
    def from_dir(cls, model_dir: Path) -> Tokenizer:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{model_dir} has no tokenizer.json")
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
        return cls(tokenizer, _read_eos_token_ids(model_dir, tokenizer))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False, keep: Iterable[str] = ()) -> str:
        """One-shot decode; with skip_special_tokens, special tokens named in `keep` still show."""
        return self._raw_decode(self._visible_ids(ids, skip_special_tokens, self._keep_ids(keep)))

    def token_id(self, text: str) -> int:
        """The id of the single token whose text is `text` (special tokens, "\\n", ...)."""
        token_id = self._tokenizer.token_to_id(text)
        if token_id is None:
            ids = self.encode(text)  # byte-level vocabularies store "\n" as "Ċ"
            if len(ids) != 1:
                raise TokenizerError(f"{text!r} is not a single token of this tokenizer (encodes to {ids})")
            token_id = ids[0]
        return token_id

    def _keep_ids(self, keep: Iterable[str]) -> frozenset[int]:
        return frozenset(self.token_id(text) for text in keep)

    def _visible_ids(self, ids: Sequence[int], skip_special_tokens: bool, keep_ids: frozenset[int]) -> list[int]:
        if not skip_special_tokens:
            return list(ids)
        return [i for i in ids if i not in self.special_ids or i in keep_ids]

    def _raw_decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)


def _read_eos_token_ids(model_dir: Path, tokenizer: tokenizers.Tokenizer) -> tuple[int, ...]:
    eos = eos_token_ids(model_dir, tokenizer.token_to_id)
    if not eos:
        raise TokenizerError(f"{model_dir}: no eos_token_id in generation_config.json or config.json "
                             "and no eos_token in tokenizer_config.json")
    return eos


class IncrementalDetokenizer:
    """Token ids in, text deltas out; the deltas concatenate to the one-shot decode.

    Decoding works on a window `ids[prefix:]`. Its first tokens (`ids[prefix:read]`) are context
    whose text was already emitted; they let decoders that depend on the previous token (leading
    spaces) decode the rest correctly. `sent` counts how many characters of the window's text
    have been emitted. Invariant: `read` is a safe split point, i.e. the text of `ids[:read]` is
    final whatever comes next.

    A lossy UTF-8 decode shows an incomplete trailing character as one U+FFFD, and everything
    before it is final; so the last character is held back while it is U+FFFD. When the window
    ends on a complete character, it slides (prefix ← read, read ← end), so each feed decodes a
    handful of tokens: O(1) per token. Bytes that never form a character (a model emitting
    garbage) would stall the slide; after MAX_PENDING tokens a safe split point is searched among
    the last few token boundaries instead.
    """

    CONTEXT_TOKENS = 5  # prompt tokens kept as initial context
    MAX_PENDING = 4  # a UTF-8 character spans at most 4 tokens

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        *,
        skip_special_tokens: bool = True,
        keep: Iterable[str] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._keep = tokenizer._keep_ids(keep)
        self._ids = tokenizer._visible_ids(list(prompt_ids or ())[-self.CONTEXT_TOKENS:], self._skip, self._keep)
        self._prefix = 0
        self._read = len(self._ids)
        self._context_chars = len(self._decode(0, self._read))  # len(text of ids[prefix:read])
        self._sent = self._context_chars

    def feed(self, token_ids: Sequence[int]) -> str:
        """Append token ids; return the newly final text (possibly "")."""
        visible = self._tokenizer._visible_ids(token_ids, self._skip, self._keep)
        if not visible:
            return ""
        self._ids.extend(visible)
        text = self._decode(self._prefix, len(self._ids))
        held = text.endswith(REPLACEMENT_CHAR)
        stable = len(text) - 1 if held else len(text)
        delta = text[self._sent:stable]
        self._sent = max(self._sent, stable)
        if not held:
            self._slide(len(self._ids), len(text))
        elif len(self._ids) - self._read > self.MAX_PENDING:
            self._split_invalid_bytes(text)
        return delta

    def finish(self) -> str:
        """Flush what is still held back (a trailing incomplete character decodes as U+FFFD)."""
        text = self._decode(self._prefix, len(self._ids))
        delta = text[self._sent:]
        self._sent = len(text)
        return delta

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer._raw_decode(self._ids[start:end])

    def _slide(self, new_read: int, chars_to_new_read: int) -> None:
        """Start the window at `read`; `new_read` (a safe split point) becomes the read offset.

        `chars_to_new_read` is the length of the current window's text up to `new_read`.
        """
        sent_beyond = self._sent - chars_to_new_read
        self._prefix, self._read = self._read, new_read
        self._context_chars = len(self._decode(self._prefix, self._read))
        self._sent = self._context_chars + sent_beyond

    def _split_invalid_bytes(self, text: str) -> None:
        end = len(self._ids)
        for k in range(end - 1, max(self._read, end - 2 * self.MAX_PENDING), -1):
            head = self._decode(self._prefix, k)
            # k is a safe split when the bytes before it can no longer join those after it.
            if len(head) <= self._sent and head + self._decode(k, end) == text:
                self._slide(k, len(head))
                return


class StopStringMatcher:
    """Cuts a text stream at the first stop string; stop strings are never emitted.

    The match is the stop string that completes first in the text (ties: the longest), which is
    the same for every split of the text into chunks. Text that could still become a stop string
    (a suffix that is a proper prefix of one) is held back until decided.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self._stops = tuple(dict.fromkeys(stops))
        self._held = ""
        self.matched: str | None = None

    def feed(self, text: str) -> tuple[str, str | None]:
        """Return (text safe to emit, the stop string if one matched now)."""
        if self.matched is not None:
            return "", None
        buf = self._held + text
        match = self._first_match(buf)
        if match is not None:
            start, stop = match
            self._held = ""
            self.matched = stop
            return buf[:start], stop
        keep = self._longest_partial_suffix(buf)
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], None

    def finish(self) -> str:
        """Release the held text at the end of the stream (it did not become a stop string)."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, buf: str) -> tuple[int, str] | None:
        ends = [(buf.find(stop) + len(stop), -len(stop), stop) for stop in self._stops if stop in buf]
        if not ends:
            return None
        end, minus_len, stop = min(ends)
        return end + minus_len, stop

    def _longest_partial_suffix(self, buf: str) -> int:
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), longest, -1):
                if buf.endswith(stop[:n]):
                    longest = n
                    break
        return longest
