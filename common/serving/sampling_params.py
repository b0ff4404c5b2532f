"""Per-request sampling parameters (torch-free: the gateway imports this module).

Conventions (the gateway's proto conversion fills these; defaults match SGLang/OpenAI):
- `temperature == 0` means greedy. `top_k == 1` is greedy too (SGLang normalises T=0 to top_k=1).
- `top_k` 0 or -1 means off; `top_p == 1` and `min_p == 0` are off.
- `seed`: a seeded request draws its randomness from its own generator derived from
  (seed, output position), so its tokens do not depend on which other requests share the batch.
- `min_tokens`: while fewer than `min_tokens` tokens were generated, `stop_token_ids` are masked,
  and so are the model's EOS ids unless `ignore_eos` is set.
- `ignore_eos`: EOS ids do not finish the request (the scheduler's stop check skips them); EOS is
  then an ordinary token and is not masked. `stop_token_ids` still stop.
- `logprobs` / `top_logprobs`: log-softmax of the logits after the logit processors and before
  temperature / top-k / top-p / min-p (see `common.sampling.sampler`).
- `thinking_budget`: None = no budget; otherwise docs/parsers.md rule 7.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_LOGIT_BIAS = 100.0  # OpenAI's limit


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict, hash=False)
    min_tokens: int = 0
    max_tokens: int | None = None  # None: bounded only by the context length
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    thinking_budget: int | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def top_k_off(self) -> bool:
        return self.top_k in (0, -1)

    @property
    def has_penalties(self) -> bool:
        return (
            self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or self.repetition_penalty != 1.0
        )

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError whose message names the offending field (`sampling.<field>`)."""
        _check(_finite(self.temperature) and self.temperature >= 0.0,
               "sampling.temperature must be a finite number >= 0 (0 = greedy)", self.temperature)
        _check(_finite(self.top_p) and 0.0 < self.top_p <= 1.0, "sampling.top_p must be in (0, 1]", self.top_p)
        _check(_is_int(self.top_k) and (self.top_k >= 1 or self.top_k in (0, -1)),
               "sampling.top_k must be -1 or 0 (off) or an integer >= 1", self.top_k)
        _check(_finite(self.min_p) and 0.0 <= self.min_p <= 1.0, "sampling.min_p must be in [0, 1]", self.min_p)
        _check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**64),
               "sampling.seed must be an integer in [0, 2**64)", self.seed)
        _check(_finite(self.frequency_penalty) and -2.0 <= self.frequency_penalty <= 2.0,
               "sampling.frequency_penalty must be in [-2, 2]", self.frequency_penalty)
        _check(_finite(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0,
               "sampling.presence_penalty must be in [-2, 2]", self.presence_penalty)
        _check(_finite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 2.0,
               "sampling.repetition_penalty must be in (0, 2]", self.repetition_penalty)
        for tok, bias in self.logit_bias.items():
            _check(_is_int(tok) and 0 <= tok < vocab_size,
                   f"sampling.logit_bias keys must be token ids in [0, {vocab_size})", tok)
            _check(_finite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS,
                   f"sampling.logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]", bias)
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0,
               "sampling.min_tokens must be an integer >= 0", self.min_tokens)
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
               "sampling.max_tokens must be an integer >= 1", self.max_tokens)
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens,
                   "sampling.min_tokens must be <= sampling.max_tokens", self.min_tokens)
        for tok in self.stop_token_ids:
            _check(_is_int(tok) and 0 <= tok < vocab_size,
                   f"sampling.stop_token_ids must be token ids in [0, {vocab_size})", tok)
        _check(_is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
               f"sampling.top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]", self.top_logprobs)
        _check(self.top_logprobs == 0 or self.logprobs,
               "sampling.top_logprobs requires sampling.logprobs to be true", self.top_logprobs)
        _check(self.thinking_budget is None or (_is_int(self.thinking_budget) and self.thinking_budget >= 0),
               "sampling.thinking_budget must be an integer >= 0", self.thinking_budget)


def _check(ok: bool, message: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{message} (got {value!r})")


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
