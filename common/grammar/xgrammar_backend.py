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
    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        self.m = xgr.GrammarMatcher(compiled)

    def accept_token(self, token: int) -> bool:
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

    def _compile(self, grammar: Grammar) -> xgr.CompiledGrammar:
        c, src = self.compiler, grammar.source
        if grammar.kind == "json_schema":
            return c.compile_json_schema(src, any_whitespace=True)
        if grammar.kind == "json_object":
            return c.compile_builtin_json_grammar()
        if grammar.kind == "regex":
            return c.compile_regex(src)
        if grammar.kind == "ebnf":
            return c.compile_grammar(src)
        if grammar.kind == "structural_tag":
            return c.compile_structural_tag(src)
        raise GrammarCompileError(grammar.kind, "is not a grammar kind")

    def matcher(self, compiled: CompiledGrammar) -> XGrammarMatcher:
        return XGrammarMatcher(compiled.handle)
