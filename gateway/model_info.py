"""What the gateway reads from the model directory besides the tokenizer: limits and defaults.

config.json (optional for the gateway): vocab_size, max_position_embeddings.
generation_config.json: sampling defaults (temperature, top_p, top_k, min_p, repetition_penalty)
used when a request leaves them unset (SamplingParams.from_generation_config). The eos ids come
from the Tokenizer, which reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.serving.model_files import read_json
from common.serving.sampling_params import SamplingParams


@dataclass(frozen=True)
class ModelInfo:
    path: str
    vocab_size: int
    context_length: int
    eos_token_ids: tuple[int, ...]
    defaults: SamplingParams  # the values of absent request fields

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
        return cls(path=str(d), vocab_size=vocab, context_length=int(ctx),
                   eos_token_ids=tuple(eos_token_ids), defaults=SamplingParams.from_generation_config(gen))
