"""What the gateway reads from the model directory besides the tokenizer: limits and defaults.

config.json (optional for the gateway): vocab_size, max_position_embeddings.
generation_config.json: sampling defaults (temperature, top_p, top_k, min_p, repetition_penalty)
used when a request leaves them unset. The eos ids come from the Tokenizer, which reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.serving.model_files import read_json


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0            # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class ModelInfo:
    path: str
    vocab_size: int
    context_length: int
    eos_token_ids: tuple[int, ...]
    defaults: SamplingDefaults

    @classmethod
    def from_dir(cls, path: str | Path, *, tokenizer_vocab_size: int, eos_token_ids: tuple[int, ...],
                 context_length: int | None = None) -> ModelInfo:
        """`eos_token_ids` come from the tokenizer (generation_config.json first), read once there."""
        d = Path(path)
        config = read_json(d / "config.json")
        gen = read_json(d / "generation_config.json")
        tok_cfg = read_json(d / "tokenizer_config.json")
        vocab = max(int(config.get("vocab_size") or 0), tokenizer_vocab_size)
        ctx = context_length or config.get("max_position_embeddings") or tok_cfg.get("model_max_length")
        if not ctx or int(ctx) <= 0:
            raise ValueError(f"{d}: no max_position_embeddings in config.json and no model_max_length in "
                             "tokenizer_config.json; pass --context-length")
        base = SamplingDefaults()
        defaults = SamplingDefaults(
            temperature=float(gen.get("temperature", base.temperature)),
            top_p=float(gen.get("top_p", base.top_p)),
            top_k=max(int(gen.get("top_k", base.top_k)), 0),
            min_p=float(gen.get("min_p", base.min_p)),
            repetition_penalty=float(gen.get("repetition_penalty", base.repetition_penalty)),
        )
        return cls(path=str(d), vocab_size=vocab, context_length=int(ctx),
                   eos_token_ids=tuple(eos_token_ids), defaults=defaults)
