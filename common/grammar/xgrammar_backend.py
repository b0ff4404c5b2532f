"""The xgrammar backend (default): compiled grammars with a precomputed token-mask cache, so a mask
fill is mostly a lookup (docs/structured_output.md has the measurements behind the choice)."""

from __future__ import annotations

from typing import Any

import torch
import xgrammar as xgr

from common.grammar.backend import CompiledGrammar, GrammarBackend, GrammarCompileError
from common.grammar.vocab import GrammarVocab
from common.serving.sampling_params import Grammar

_VOCAB_TYPE = {"byte_level": xgr.VocabType.BYTE_LEVEL, "byte_fallback": xgr.VocabType.BYTE_FALLBACK,
               "raw": xgr.VocabType.RAW}


class XGrammarMatcher:
    # no batched fill: xgrammar's BatchGrammarMatcher (8 threads) took ~3.9 ms for 32 or 64 rows on a
    # 16-core host where one thread fills 32 rows in ~1.2 ms (docs/performance.md §7c)
    def __init__(self, compiled: xgr.CompiledGrammar, special: frozenset[int]) -> None:
        self.m = xgr.GrammarMatcher(compiled)
        self.special = special

    def accept_token(self, token: int) -> bool:
        if token in self.special:  # refused anyway; xgrammar would log a warning for each (draft tokens)
            return False
        return bool(self.m.accept_token(token))

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.m.fill_next_token_bitmask(bitmask, row)

    def rollback(self, n: int) -> None:
        if n > 0:
            self.m.rollback(n)

    def is_terminated(self) -> bool:
        return bool(self.m.is_terminated())


class XGrammarBackend(GrammarBackend):
    name = "xgrammar"

    def __init__(self, vocab: GrammarVocab, **kwargs: Any) -> None:
        super().__init__(vocab, **kwargs)
        info = xgr.TokenizerInfo(list(vocab.tokens), _VOCAB_TYPE[vocab.kind], vocab_size=vocab.vocab_size,
                                 stop_token_ids=list(vocab.end_ids))
        # our own LRU cache sits in front; xgrammar's would only double the memory
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.special = frozenset(info.special_token_ids) - set(vocab.end_ids)

    def _compile(self, grammar: Grammar) -> xgr.CompiledGrammar:
        c, src = self.compiler, grammar.source
        # JSON laid out as json.dumps does (", " and ": "): free whitespace lets a model pad forever
        if grammar.kind == "json_schema":
            return c.compile_json_schema(src, any_whitespace=False)
        if grammar.kind == "json_object":  # an object (the builtin JSON grammar also allows arrays and scalars)
            return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if grammar.kind == "regex":
            return c.compile_regex(src)
        if grammar.kind == "ebnf":
            return c.compile_grammar(src)
        if grammar.kind == "structural_tag":
            return c.compile_structural_tag(src)
        raise GrammarCompileError(grammar.kind, "is not a grammar kind")

    def matcher(self, compiled: CompiledGrammar) -> XGrammarMatcher:
        return XGrammarMatcher(compiled.handle, self.special)
