"""Grammar backends: compile a `Grammar` once (LRU cache keyed by (kind, source), compiled on a thread
pool with a time bound) and make a `Matcher` per request.

A Matcher is the backend's parser state over the tokens sampled so far. The bitmask it fills is
packed int32 [rows, ceil(V/32)] on the CPU: bit (id % 32) of word id // 32 is 1 when token id may
come next. Backends mark their own end marker (the model's end-of-text ids, `GrammarVocab.end_ids`)
exactly when the grammar accepts; `common.grammar.state.GrammarState` turns that into the request's
own stop ids.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any, Protocol

import numpy as np
import torch

from common.grammar.vocab import GrammarVocab, control_byte_ids
from common.serving import metrics
from common.serving.sampling_params import Grammar, SamplingError

log = logging.getLogger(__name__)

DEFAULT_BACKEND = "xgrammar"
DEFAULT_COMPILE_TIMEOUT_S = 10.0


class GrammarCompileError(SamplingError):
    """A grammar the backend refused (or did not finish compiling in time): INVALID_ARGUMENT, the
    message starting with the field, e.g. "grammar.regex: Unclosed '['"."""

    def __init__(self, kind: str, problem: str) -> None:
        super().__init__(f"grammar.{kind}:", problem)


class Matcher(Protocol):
    """One request's parser state (not thread-safe: the engine thread owns it)."""

    def accept_token(self, token: int) -> bool:
        """Advance over `token`; False (state unchanged) when the grammar does not allow it."""
        ...

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (int32 [*, ceil(V/32)], CPU)."""
        ...

    def rollback(self, n: int) -> None:
        """Undo the last n accepted tokens."""
        ...

    def is_terminated(self) -> bool: ...


class CompiledGrammar:
    """A backend's compiled form of one Grammar, with the seconds its compile took."""

    def __init__(self, grammar: Grammar, handle: Any, seconds: float) -> None:
        self.grammar = grammar
        self.handle = handle
        self.seconds = seconds


class GrammarBackend(ABC):
    name: str

    def __init__(self, vocab: GrammarVocab, *, cache_size: int = 512,
                 compile_timeout: float = DEFAULT_COMPILE_TIMEOUT_S, threads: int = 2) -> None:
        self.vocab = vocab
        self.compile_timeout = compile_timeout
        # LRU by (kind, source): the compiled grammar, or the error it compiled to (a client repeating a
        # broken grammar must not cost a compile each time)
        self._cache: OrderedDict[Grammar, CompiledGrammar | GrammarCompileError] = OrderedDict()
        self._cache_size = cache_size
        self._pending: dict[Grammar, concurrent.futures.Future[CompiledGrammar]] = {}
        self._lock = threading.RLock()  # RLock: a done-callback may run inside `submit`'s critical section
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix=f"grammar-{self.name}")
        self._json_safe: np.ndarray | None = None

    @property
    def vocab_size(self) -> int:
        return self.vocab.vocab_size

    def json_safe_words(self) -> np.ndarray:
        """uint32 bitmask words (bit i of word i // 32 = id i) of the ids without a control character."""
        if self._json_safe is None:
            words = np.full((self.vocab_size + 31) // 32, 0xFFFFFFFF, dtype=np.uint32)
            for i in control_byte_ids(self.vocab):
                words[i // 32] &= np.uint32(~(1 << (i % 32)) & 0xFFFFFFFF)
            self._json_safe = words
        return self._json_safe

    # ------------------------------------------------------------------ compiling
    def compile(self, grammar: Grammar) -> CompiledGrammar:
        """Compile now on the calling thread (cached, errors too); raises GrammarCompileError."""
        hit = self._cached(grammar)
        if hit is not None:
            return hit
        start = time.perf_counter()
        try:
            handle = self._compile(grammar)
        except Exception as e:  # noqa: BLE001 - the engines raise RuntimeError/ValueError/Exception with their reason
            metrics.grammar_compile_seconds().labels(kind=grammar.kind, outcome="error").observe(
                time.perf_counter() - start)
            error = e if isinstance(e, GrammarCompileError) else GrammarCompileError(grammar.kind, _reason(e))
            self._store(grammar, error)
            raise error from None
        compiled = CompiledGrammar(grammar, handle, time.perf_counter() - start)
        metrics.grammar_compile_seconds().labels(kind=grammar.kind, outcome="ok").observe(compiled.seconds)
        self._store(grammar, compiled)
        log.log(logging.INFO if compiled.seconds > 1.0 else logging.DEBUG, "%s: compiled %s grammar (%d chars) in %.1f ms",
                self.name, grammar.kind, len(grammar.source), compiled.seconds * 1e3)
        return compiled

    def submit(self, grammar: Grammar) -> concurrent.futures.Future[CompiledGrammar]:
        """The compile of `grammar` on the pool (one per distinct grammar in flight; done at once when cached)."""
        with self._lock:
            if grammar in self._cache:
                done: concurrent.futures.Future[CompiledGrammar] = concurrent.futures.Future()
                try:
                    done.set_result(self._cached(grammar))  # type: ignore[arg-type]
                except GrammarCompileError as e:
                    done.set_exception(e)
                return done
            fut = self._pending.get(grammar)
            if fut is None:
                fut = self._pool.submit(self.compile, grammar)
                self._pending[grammar] = fut
                fut.add_done_callback(lambda _f, g=grammar: self._forget(g))
            return fut

    async def compile_async(self, grammar: Grammar) -> CompiledGrammar:
        """Compile off the event loop and off the engine thread, bounded by `compile_timeout`: past it
        the request fails (GrammarCompileError) while the compile finishes in the background, cached."""
        fut = asyncio.wrap_future(self.submit(grammar))
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.compile_timeout)
        except TimeoutError:
            raise GrammarCompileError(grammar.kind, f"did not compile within {self.compile_timeout:g} s "
                                                    "(--grammar-compile-timeout)") from None

    def _cached(self, grammar: Grammar) -> CompiledGrammar | None:
        """The cached compile (refreshed in the LRU order), None when absent; raises a cached error."""
        with self._lock:
            hit = self._cache.get(grammar)
            if hit is not None:
                self._cache.move_to_end(grammar)
        if isinstance(hit, GrammarCompileError):
            raise GrammarCompileError(grammar.kind, str(hit).split(": ", 1)[1]) from None
        return hit

    def _store(self, grammar: Grammar, value: CompiledGrammar | GrammarCompileError) -> None:
        with self._lock:
            self._cache[grammar] = value
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _forget(self, grammar: Grammar) -> None:
        with self._lock:
            self._pending.pop(grammar, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ backend specifics
    @abstractmethod
    def _compile(self, grammar: Grammar) -> Any: ...

    @abstractmethod
    def matcher(self, compiled: CompiledGrammar) -> Matcher: ...


def require_backend(backend: GrammarBackend | None, grammar: Grammar) -> GrammarBackend:
    """The backend to compile `grammar`, or INVALID_ARGUMENT naming the field when there is none."""
    if backend is None:
        raise SamplingError(f"grammar.{grammar.kind}",
                            "is not supported: this worker runs with --grammar-backend none")
    return backend


_CPP_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")  # "[06:00:00] /project/cpp/x.cc:94: "


def _reason(e: Exception) -> str:
    """The backend's message, first line, without its C++ source-location prefix."""
    text = str(e).strip() or type(e).__name__
    return _CPP_PREFIX.sub("", text.splitlines()[0])[:500]
