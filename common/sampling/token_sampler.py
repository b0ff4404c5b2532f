"""Logit processors + sampler for the rows of one forward, each row with its own history.

Shared by the prefill worker (first token), the plain decode step and the EAGLE verify (where
`target_probs` of every tree node is needed instead of one sample).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common import ops
from common.sampling.logit_processors import (
    ForcedPrefix,
    RowContext,
    ThinkingBudget,
    ThinkState,
    apply_processors,
    fill_grammar_bitmask,
)
from common.sampling.sampler import SamplingTensors, sample, target_probs, uses_filter
from common.serving.sampling_params import SamplingParams


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the processors need, looked up from the tokenizer by text (never hard-coded)."""

    think_start: int | None
    think_end: int | None
    newline: int | None
    eos: tuple[int, ...]

    @classmethod
    def from_model_dir(cls, model_dir: str) -> SpecialIds:
        from pathlib import Path

        from tokenizers import Tokenizer

        from common.serving.model_files import eos_token_ids

        tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        enc = tok.encode("\n", add_special_tokens=False).ids
        return cls(tok.token_to_id("<think>"), tok.token_to_id("</think>"),
                   enc[0] if len(enc) == 1 else None, eos_token_ids(model_dir, tok.token_to_id))

    def thinking_budget(self) -> ThinkingBudget | None:
        if None in (self.think_start, self.think_end, self.newline):
            return None
        return ThinkingBudget(self.think_start, self.think_end, self.newline)  # type: ignore[arg-type]


@dataclass
class SampledRow:
    token: int
    logprob: float | None
    top: list[tuple[int, float]]


class TokenSampler:
    def __init__(self, ids: SpecialIds, seed: int = 0) -> None:
        self.ids = ids
        self.budget = ids.thinking_budget()
        self.forced = ForcedPrefix(ids.think_end, ids.newline)
        self.generator = torch.Generator().manual_seed(seed)
        self._mask_buf: torch.Tensor | None = None  # host grammar bitmask, reused across steps

    def process(self, logits: torch.Tensor, rows: Sequence[RowContext]) -> torch.Tensor:
        """Apply every row's processors, then its grammar mask, in place; logits [R, V] fp32.

        The grammar masks are filled on the host first, before anything here waits for the device,
        so on CUDA the fill overlaps the forward that produces `logits`; the mask is applied last, so
        nothing (logit_bias included) revives a token the grammar forbids."""
        bitmask = self._grammar_bitmask(rows, logits.shape[1])
        needs_budget = any(r.params.thinking_budget is not None for r in rows)
        needs_forced = any(r.params.forced_prefix for r in rows)
        apply_processors(logits, rows, self.budget if needs_budget else None, eos_token_ids=self.ids.eos,
                         forced=self.forced if needs_forced else None)
        if bitmask is not None:
            ops.apply_token_bitmask(logits, bitmask.to(logits.device, non_blocking=True))
        return logits

    def _grammar_bitmask(self, rows: Sequence[RowContext], vocab: int) -> torch.Tensor | None:
        """[R, ceil(V/32)] int32 masks of the rows (all ones where no grammar constrains), None when no
        row is constrained. On CUDA the buffer is pinned and reused: every step reads its tokens back
        (a sync) before the next step fills it again, so the previous copy out of it has finished."""
        if not any(r.params.grammar is not None for r in rows):
            return None
        shape = (len(rows), (vocab + 31) // 32)
        buf = self._mask_buf
        if buf is None or buf.shape[0] < shape[0] or buf.shape[1] != shape[1]:
            pin = torch.cuda.is_available()
            buf = self._mask_buf = torch.empty((max(shape[0], 64), shape[1]), dtype=torch.int32, pin_memory=pin)
        bitmask = buf[:shape[0]]
        bitmask.fill_(-1)
        return bitmask if fill_grammar_bitmask(bitmask, rows) else None

    def sample(self, logits: torch.Tensor, rows: Sequence[RowContext]) -> list[SampledRow]:
        """Process then sample one token per row (seeded rows use (seed, output position))."""
        self.process(logits, rows)
        params = [r.params for r in rows]
        out = sample(logits, params, steps=[len(r.output_ids) for r in rows], generator=self.generator)
        tokens = out.tokens.tolist()
        lps = out.logprobs.tolist() if out.logprobs is not None else [None] * len(rows)
        tops: list[list[tuple[int, float]]] = [[] for _ in rows]
        if out.top_logprobs is not None:
            ids, vals = (t.tolist() for t in out.top_logprobs)
            tops = [list(zip(i[: p.top_logprobs], v[: p.top_logprobs])) for i, v, p in zip(ids, vals, params)]
        return [SampledRow(int(t), lp, top) for t, lp, top in zip(tokens, lps, tops)]

    def processors_active(self, params: SamplingParams, step: int,
                          think: tuple[ThinkState, int] | None = None) -> bool:
        """Whether any logit processor may change a row at output position `step` (output tokens
        before it) or later: penalties, logit bias, min_tokens not yet reached, a forced tool-call
        prefix (reads the history until its answer began; counted for the whole request), a grammar
        (its mask is filled on the host from the request's matcher), the thinking budget. The budget counts only where it may force a token: `think` = (the request's ThinkState
        over what the host has seen, prompt length) lets a row far from its budget skip it; without
        it, it always counts."""
        if (params.has_penalties or params.logit_bias or step < params.min_tokens or params.forced_prefix
                or params.grammar is not None):
            return True
        if params.thinking_budget is None or self.budget is None:
            return False
        if think is None:
            return True
        state, prompt_len = think
        return self.budget.may_force(params.thinking_budget, state, prompt_len + step)

    def needs_host(self, params: SamplingParams, step: int,
                   think: tuple[ThinkState, int] | None = None) -> bool:
        """Whether a row needs `sample` rather than `sample_on_device`: a processor is active (they read
        the host history, or are simply not done on the device path), or it wants logprobs."""
        return params.logprobs or self.processors_active(params, step, think)

    def sample_on_device(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                         steps: Sequence[int]) -> torch.Tensor:
        """`sample` for rows `needs_host` refuses (their processors are no-ops), without the host copy:
        tokens [R] int64 on the logits' device, nothing waits for the device, same tokens as `sample`."""
        return sample(logits, params, steps=steps, generator=self.generator).tokens

    def probs(self, logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """Target distribution per (already processed) row: [R, V] fp32."""
        st = SamplingTensors.from_params(params, logits.device)
        return target_probs(logits, *st, filtered=uses_filter(params, logits.shape[1]))
