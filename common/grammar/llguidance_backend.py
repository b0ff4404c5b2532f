"""The llguidance backend (optional extra): an Earley parser over a lexer, no per-grammar mask
precompute, so compiles are near-instant and each mask is computed on demand."""

from __future__ import annotations

import json
import os
from typing import Any

import llguidance as llg
import llguidance.torch as llg_torch
import torch
from llguidance.gbnf_to_lark import gbnf_to_lark

from common.grammar.backend import CompiledGrammar, GrammarBackend, GrammarCompileError
from common.grammar.vocab import GrammarVocab
from common.serving.sampling_params import Grammar

# JSON laid out as json.dumps does, as with xgrammar: free whitespace lets a model pad forever
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class LLGuidanceMatcher:
    def __init__(self, tokenizer: llg.LLTokenizer, grammar: str) -> None:
        self.m = llg.LLMatcher(tokenizer, grammar, log_level=0)
        if self.m.is_error():
            raise RuntimeError(self.m.get_error())

    def accept_token(self, token: int) -> bool:
        # consume_token of a disallowed token would leave the matcher in its error state for good
        return self.m.validate_tokens([token]) == 1 and bool(self.m.consume_token(token))

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        llg_torch.fill_next_token_bitmask(self.m, bitmask, row)

    @staticmethod
    def fill_many(pairs: list[tuple[LLGuidanceMatcher, int]], bitmask: torch.Tensor) -> None:
        """Fill bitmask[row] of each (matcher, row): one call, spread over llguidance's own threads."""
        if len(pairs) == 1:
            pairs[0][0].fill_bitmask(bitmask, pairs[0][1])
            return
        llg_torch.fill_next_token_bitmask_par(_executor(), [(m.m, row) for m, row in pairs], bitmask)

    def rollback(self, n: int) -> None:
        if n > 0 and not self.m.rollback(n):
            raise RuntimeError(f"llguidance could not roll back {n} tokens: {self.m.get_error()}")

    def is_terminated(self) -> bool:
        return bool(self.m.is_stopped())


_EXECUTOR: llg.LLExecutor | None = None


def _executor() -> llg.LLExecutor:
    """The process's batched filler: up to 8 threads, half the cores."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = llg.LLExecutor(max(1, min(8, (os.cpu_count() or 2) // 2)))
    return _EXECUTOR


class LLGuidanceBackend(GrammarBackend):
    name = "llguidance"

    def __init__(self, vocab: GrammarVocab, **kwargs: Any) -> None:
        super().__init__(vocab, **kwargs)
        self.tokenizer = llg.LLTokenizer(vocab.tokenizer_json, n_vocab=vocab.vocab_size,
                                         eos_token=list(vocab.end_ids))

    def _compile(self, grammar: Grammar) -> str:
        kind, src = grammar.kind, grammar.source
        if kind == "json_schema":
            try:
                json.loads(src)
            except ValueError as e:
                raise GrammarCompileError(kind, f"is not valid JSON: {e}") from None
            text = llg.LLMatcher.grammar_from_json_schema(src, overrides=_JSON_LAYOUT)
        elif kind == "json_object":
            text = llg.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=_JSON_LAYOUT)
        elif kind == "regex":
            text = llg.LLMatcher.grammar_from_regex(src)
        elif kind == "ebnf":  # the GBNF dialect xgrammar also reads ("root ::= ..."), converted to Lark
            text = llg.LLMatcher.grammar_from_lark(gbnf_to_lark(src))
        else:
            raise GrammarCompileError(kind, "is not supported by the llguidance backend")
        error = llg.LLMatcher.validate_grammar(text, self.tokenizer)
        if error:
            raise GrammarCompileError(kind, error.strip().splitlines()[0][:500])
        return text

    def matcher(self, compiled: CompiledGrammar) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(self.tokenizer, compiled.handle)
