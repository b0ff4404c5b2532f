"""One request's grammar state: the backend matcher, the reasoning gate, and the request's stop ids.

- Gate: with `reasoning_first` the reasoning is free text; the grammar starts after the first
  `</think>` of the output. Otherwise it starts at the first output token.
- Stops: the backend allows its end marker (the model's eos ids) exactly when the grammar accepts;
  `fill` replaces it by the request's stop ids, so they are allowed whenever the grammar accepts (EOS
  only then), and sampling one ends the request (the matcher is never fed a stop id).
- Committed tokens are fed by `advance` (decode_worker.commit.commit_tokens); `fill` takes a row's
  whole history (committed output + an EAGLE draft path beyond it), feeds the uncommitted part
  temporarily and rolls it back, so every verify row of a draft tree gets the mask of its own path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from common.grammar.backend import (
    CompiledGrammar,
    GrammarBackend,
    GrammarCompileError,
    Matcher,
    require_backend,
)
from common.serving.sampling_params import SamplingParams

# JSON kinds: xgrammar's JSON string rule admits control characters other than CR / LF, which strict
# JSON parsers (Python's json, JavaScript's JSON.parse) refuse; with the fixed JSON layout no token
# holding one is ever needed, so they are masked (common/grammar/vocab.py control_byte_ids)
JSON_KINDS = frozenset({"json_schema", "json_object"})


class GrammarState:
    def __init__(self, matcher: Matcher, end_ids: Sequence[int], stop_ids: Sequence[int],
                 gate_id: int | None, allowed_words: np.ndarray | None = None) -> None:
        """end_ids: the backend's end marker; stop_ids: the request's stop ids (its eos included unless
        ignore_eos); gate_id: the `</think>` id when the output starts inside reasoning, else None;
        allowed_words: a uint32 bitmask every filled row is ANDed with (JSON: no control characters)."""
        self.matcher = matcher
        self.allowed_words = allowed_words
        self.end_ids = tuple(end_ids)
        self.stop_ids = frozenset(stop_ids)
        self.gate_id = gate_id
        self.start: int | None = 0 if gate_id is None else None  # output index where the grammar starts
        self.fed = 0  # output tokens `advance` has seen
        self.tokens = 0  # committed output tokens sampled under the grammar
        self.stopped = False  # a stop id ended it
        self.violation: str | None = None  # a committed token the grammar refused (never with the mask on)
        # (word, bit) of the end ids, and of the ids allowed once the grammar accepts: the request's
        # stop ids, or the end ids again when it has none (ignore_eos without stop ids)
        self._end_bits = _word_bits(self.end_ids)
        self._stop_bits_on = _word_bits(sorted(self.stop_ids) or self.end_ids)

    @classmethod
    def create(cls, backend: GrammarBackend, compiled: CompiledGrammar, stop_ids: Sequence[int],
               reasoning_first: bool, think_end_id: int | None) -> GrammarState:
        gate = think_end_id if reasoning_first else None
        allowed = backend.json_safe_words() if compiled.grammar.kind in JSON_KINDS else None
        return cls(backend.matcher(compiled), backend.vocab.end_ids, stop_ids, gate, allowed)

    def active(self) -> bool:
        """Whether the next token after the committed output is sampled under the grammar."""
        return self.start is not None and not self.stopped

    def is_terminated(self) -> bool:
        """A stop id (or, with no stop id of the request's own, the model's end id) ended the grammar."""
        return self.stopped

    def advance(self, output_ids: Sequence[int]) -> None:
        """Feed the committed tokens not seen yet (output_ids[self.fed:])."""
        for i in range(self.fed, len(output_ids)):
            tok = int(output_ids[i])
            if self.start is None:
                if tok == self.gate_id:
                    self.start = i + 1
                continue
            if self.stopped:
                continue  # the request finished at the stop id: nothing after it is kept
            self.tokens += 1
            if tok in self.stop_ids or tok in self.end_ids:  # never fed to the matcher
                self.stopped = True
            elif not self.matcher.accept_token(tok) and self.violation is None:
                self.violation = f"output token {tok} at position {i} is outside the grammar"
        self.fed = len(output_ids)

    def fill(self, bitmask: torch.Tensor, row: int, history: Sequence[int]) -> bool:
        """Write into bitmask[row] the tokens allowed after `history` (the committed output, then
        tokens beyond it). False, leaving the row alone, when the grammar does not constrain it: still
        reasoning, stopped, or the extra tokens leave the grammar (a draft path no verify can accept)."""
        return self.fill_rows(bitmask, [(row, history)]) == 1

    def fill_rows(self, bitmask: torch.Tensor, rows: Sequence[tuple[int, Sequence[int]]]) -> int:
        """`fill` for several rows of this request (an EAGLE tree's verify rows, parents before
        children): the matcher walks from one row's path to the next through their common prefix,
        rolling back only what differs, and back to the committed state at the end. Returns the number
        of rows constrained."""
        return fill_states(bitmask, [(self, rows)])

    def _walk(self, path: list[int], want: list[int]) -> bool:
        """Move the matcher from `path` (grammar tokens it holds beyond the committed state, updated
        in place) to `want` through their common prefix; False when `want` leaves the grammar."""
        common = 0
        while common < min(len(path), len(want)) and path[common] == want[common]:
            common += 1
        if len(path) > common:
            self.matcher.rollback(len(path) - common)
            del path[common:]
        for tok in want[common:]:
            if tok in self.stop_ids or tok in self.end_ids or not self.matcher.accept_token(tok):
                return False
            path.append(tok)
        return True

    def _grammar_path(self, history: Sequence[int]) -> list[int] | None:
        """The tokens of `history` past the committed output that the grammar reads (those after the
        gate when it is crossed there); None when the row is not under the grammar."""
        if self.stopped:
            return None
        extra = [int(t) for t in history[self.fed:]]
        if self.start is not None:
            return extra
        if self.gate_id in extra:
            return extra[extra.index(self.gate_id) + 1:]
        return None

    def _stop_bits(self, words: memoryview) -> None:
        """One row's words (a uint32 memoryview: plain Python ints, no numpy/torch scalar cost): the
        end ids give way to the request's stop ids."""
        accepting = any(words[w] & b for w, b in self._end_bits)
        for w, b in self._end_bits:
            words[w] &= ~b & 0xFFFFFFFF
        if accepting:
            for w, b in self._stop_bits_on:
                words[w] |= b


def fill_states(bitmask: torch.Tensor, work: Sequence[tuple[GrammarState, Sequence[tuple[int, Sequence[int]]]]]) -> int:
    """`GrammarState.fill_rows` for many requests at once: in rounds, each taking the next row of
    every request (its matcher walked there), the round's rows filled by one batched call of their
    backend where it has one (llguidance: its own threads, without the GIL; xgrammar: row by row), then each
    row's fix-ups (the JSON kinds' control-character words, the stop ids). A plain
    decode step is one round; an EAGLE chain of n verify rows, n rounds. Every matcher is back at its
    committed state at the end. Returns the number of rows constrained."""
    words = bitmask.numpy().view(np.uint32)  # one view for the fix-ups (torch scalar indexing is slow)
    walks = []  # [state, rows left as (row, grammar path), path the matcher holds]
    for state, rows in work:
        left = [(row, want) for row, history in rows if (want := state._grammar_path(history)) is not None]
        if left:
            left.reverse()  # popped from the end: parents before children
            walks.append((state, left, []))
    every_walk, n = list(walks), 0
    try:
        while walks:
            ready: list[GrammarState] = []
            rows: list[int] = []
            for state, left, path in walks:
                while left:
                    row, want = left.pop()
                    if state._walk(path, want):
                        ready.append(state)
                        rows.append(row)
                        break
            walks = [w for w in walks if w[1]]
            if not ready:
                continue
            by_kind: dict[type, list[tuple[Matcher, int]]] = {}
            for state, row in zip(ready, rows):
                by_kind.setdefault(type(state.matcher), []).append((state.matcher, row))
            for kind, pairs in by_kind.items():
                fill_many = getattr(kind, "fill_many", None)
                if fill_many is not None:
                    fill_many(pairs, bitmask)
                else:
                    for matcher, row in pairs:
                        matcher.fill_bitmask(bitmask, row)
            for state, row in zip(ready, rows):
                if state.allowed_words is not None:  # in place on the row's view (a gather would copy)
                    words[row, : len(state.allowed_words)] &= state.allowed_words
                state._stop_bits(memoryview(words[row]))
            n += len(rows)
    finally:
        for state, _left, path in every_walk:
            state.matcher.rollback(len(path))
    return n


def _word_bits(ids: Sequence[int]) -> list[tuple[int, int]]:
    """(word, OR of the bits of `ids` in it) for each word the ids fall in."""
    masks: dict[int, int] = {}
    for t in ids:
        masks[int(t) // 32] = masks.get(int(t) // 32, 0) | (1 << (int(t) % 32))
    return list(masks.items())


async def grammar_state_for(backend: GrammarBackend | None, params: SamplingParams,
                            think_end_id: int | None) -> GrammarState | None:
    """The request's GrammarState, its grammar compiled off the event loop (None without a grammar).
    Raises SamplingError (INVALID_ARGUMENT naming the field) when the worker has no backend, the
    grammar does not compile, or it compiles too slowly."""
    if params.grammar is None:
        return None
    b = require_backend(backend, params.grammar)
    compiled = await b.compile_async(params.grammar)
    try:
        return GrammarState.create(b, compiled, params.stop_token_ids, params.reasoning_first, think_end_id)
    except Exception as e:  # noqa: BLE001 - a matcher the engine refuses to build: still the client's grammar
        raise GrammarCompileError(params.grammar.kind, str(e).strip().splitlines()[0][:500]) from None
