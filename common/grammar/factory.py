"""Choosing a grammar backend by name (--grammar-backend); each backend module is imported only
when chosen, so llguidance stays an optional extra."""

from __future__ import annotations

from common.grammar.backend import DEFAULT_COMPILE_TIMEOUT_S, GrammarBackend
from common.grammar.vocab import GrammarVocab

BACKENDS = ("xgrammar", "llguidance", "none")


def make_backend(name: str, vocab: GrammarVocab, *, compile_timeout: float = DEFAULT_COMPILE_TIMEOUT_S,
                 threads: int = 2) -> GrammarBackend | None:
    """The backend called `name` (None for "none": constrained requests are refused)."""
    if name == "none":
        return None
    if name == "xgrammar":
        from common.grammar.xgrammar_backend import XGrammarBackend

        return XGrammarBackend(vocab, compile_timeout=compile_timeout, threads=threads)
    if name == "llguidance":
        from common.grammar.llguidance_backend import LLGuidanceBackend

        return LLGuidanceBackend(vocab, compile_timeout=compile_timeout, threads=threads)
    raise ValueError(f"unknown grammar backend {name!r}; choose one of {', '.join(BACKENDS)}")
