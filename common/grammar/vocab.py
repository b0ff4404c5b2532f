"""The vocabulary a grammar backend masks: the model's tokenizer, sized to the lm_head.

The lm_head may have more rows than the tokenizer has tokens (GLM pads to a multiple of 64); the
padded ids decode to nothing and are never allowed by any grammar. Special tokens (<think>,
<|user|>, ...) are never grammar text either: they are given as empty strings, which the backends
treat as special, and the end-of-text ids are the backends' own end marker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.serving.model_files import eos_token_ids

# tokenizer.json decoder type -> how its vocabulary strings encode bytes
_DECODER_KIND = {"ByteLevel": "byte_level", "ByteFallback": "byte_fallback", "Metaspace": "byte_fallback"}


@dataclass(frozen=True)
class GrammarVocab:
    tokens: tuple[str, ...]  # [vocab_size] encoded token strings; "" for special and padded ids
    kind: str  # "byte_level" | "byte_fallback" | "raw": how `tokens` encode bytes
    end_ids: tuple[int, ...]  # the model's end-of-text ids (generation_config eos)
    tokenizer_json: str  # the tokenizer.json text (llguidance builds its own tokenizer from it)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, vocab_size: int) -> GrammarVocab:
        """`vocab_size`: the model's lm_head rows (>= the tokenizer's size)."""
        path = Path(model_dir) / "tokenizer.json"
        text = path.read_text(encoding="utf-8")
        spec = json.loads(text)
        tokens = [""] * vocab_size
        for piece, idx in spec["model"]["vocab"].items():
            if idx < vocab_size:
                tokens[idx] = piece
        by_text = {}
        kind = _decoder_kind(spec.get("decoder"))
        symbols = byte_level_alphabet()
        for added in spec.get("added_tokens", []):
            by_text[added["content"]] = added["id"]
            if added["id"] < vocab_size:
                piece = added["content"]
                if kind == "byte_level":  # added tokens hold raw text; the engines read the vocabulary's encoding
                    piece = "".join(symbols[b] for b in piece.encode("utf-8"))
                tokens[added["id"]] = "" if added.get("special", False) else piece
        for piece, idx in spec["model"]["vocab"].items():
            by_text.setdefault(piece, idx)
        ends = tuple(t for t in eos_token_ids(str(model_dir), by_text.get) if t < vocab_size)
        if not ends:
            raise ValueError(f"{model_dir}: no end-of-text token id for the grammar backends")
        return cls(tuple(tokens), kind, ends, text)


def control_byte_ids(vocab: GrammarVocab) -> list[int]:
    """Ids whose text holds a control character (a byte below 0x20). JSON allows none of them unescaped
    inside a string (RFC 8259), which xgrammar's JSON string rule admits apart from CR and LF."""
    if vocab.kind == "byte_level":
        value = {c: b for b, c in enumerate(byte_level_alphabet())}
        decode = lambda t: bytes(value.get(c, 0x20) for c in t)
    elif vocab.kind == "byte_fallback":
        def decode(t: str) -> bytes:
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                return bytes([int(t[3:5], 16)])
            return t.replace("\u2581", " ").encode("utf-8")
    else:
        decode = lambda t: t.encode("utf-8")
    return [i for i, t in enumerate(vocab.tokens) if t and any(b < 0x20 for b in decode(t))]


def byte_level_alphabet() -> list[str]:
    """The byte-level BPE alphabet (GPT-2's): the printable character standing for each byte 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def _decoder_kind(decoder: dict | None) -> str:
    if not decoder:
        return "raw"
    if decoder.get("type") == "Sequence":
        kinds = {_DECODER_KIND.get(d.get("type", "")) for d in decoder.get("decoders", [])} - {None}
        return "byte_fallback" if "byte_fallback" in kinds else kinds.pop() if kinds else "raw"
    return _DECODER_KIND.get(decoder.get("type", ""), "raw")
