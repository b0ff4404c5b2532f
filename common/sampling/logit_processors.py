"""Logit processors: thinking budget, forced tool-call prefix, penalties, logit bias, min_tokens.

Every processor works per *row* with that row's own history (`RowContext`). For an EAGLE verify
row the caller puts into `output_ids` the committed output (which ends with the bonus token, the tree
root) followed by the draft tokens on the path from the root down to that row's node, so penalties
and the thinking budget are exact for every tree node, not "relaxed" as in SGLang (docs/speculative.md
§7).

Histories may be lists/tuples or int tensors; pass tensors (e.g. the prompt kept on the device) for
long histories used by the repetition penalty, and a `ThinkState` for the thinking budget, so a
step does not rescan the whole prompt.

Order inside `apply_processors` (each step only touches rows that use it):
  1. repetition penalty (multiplicative, prompt + output tokens; HF/SGLang: logit > 0 is divided,
     logit < 0 multiplied);
  2. frequency / presence penalties (additive, output tokens only; OpenAI semantics);
  3. logit_bias (additive);
  4. min_tokens: while len(output) < min_tokens mask `stop_token_ids`, and the EOS ids unless
     `ignore_eos` (an ignored EOS does not finish the request, so it needs no mask);
  5. thinking budget, so a forced token always wins: every logit -inf, the forced one 0;
  6. forced prefix (tool_choice "required" / named), which only acts once reasoning is over, where
     the budget no longer does: every logit -inf but the allowed ones, which keep their values.
Then, last so that nothing (logit_bias included) can revive a token it forbids, the grammar mask
(structured output; `fill_grammar_bitmask`, applied by `TokenSampler.process`): -inf for every token
the row's grammar does not allow next.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from common.serving.sampling_params import SamplingParams

if TYPE_CHECKING:
    from common.grammar.state import GrammarState


@dataclass(frozen=True, slots=True)
class ThinkState:
    """Result of scanning the first `consumed` tokens of prompt + output for think markers.

    `open_start` is the absolute index of the most recent `<think>` with no `</think>` after it,
    or None when no thinking block is open. Callers keep one per request and advance it with the
    committed tokens (`ThinkingBudget.advance`), so each step only scans the new tokens.
    """

    consumed: int = 0
    open_start: int | None = None


@dataclass(frozen=True, slots=True)
class RowContext:
    """One logits row: its request's parameters and the token history that row conditions on."""

    params: SamplingParams
    prompt_ids: Sequence[int] | torch.Tensor
    output_ids: Sequence[int] | torch.Tensor
    think_state: ThinkState | None = None  # optional cache covering a prefix of prompt + output
    grammar: GrammarState | None = None  # the request's structured-output state (params.grammar set)


class ThinkingBudget:
    """docs/parsers.md rule 7 with ids taken from the tokenizer.

    Let n be the number of tokens after the most recent `<think>` that has no `</think>` after it,
    in prompt + output. If such a `<think>` exists and n >= budget: force the newline unless the
    last *output* token is the newline (or there is no output yet, which also forces the newline);
    after a newline force `</think>`. Budget 0 works (forces newline then `</think>` at once).
    """

    def __init__(self, think_start_id: int, think_end_id: int, newline_id: int) -> None:
        self.think_start_id = think_start_id
        self.think_end_id = think_end_id
        self.newline_id = newline_id

    def advance(self, state: ThinkState, tokens: Sequence[int] | torch.Tensor) -> ThinkState:
        """State after `tokens` (the tokens following the `state.consumed` already scanned)."""
        toks = _as_list(tokens)
        last_start = _last_index(toks, self.think_start_id)
        last_end = _last_index(toks, self.think_end_id)
        if last_start < 0 and last_end < 0:
            return ThinkState(state.consumed + len(toks), state.open_start)
        open_start = state.consumed + last_start if last_start > last_end else None
        return ThinkState(state.consumed + len(toks), open_start)

    def forced_token(self, row: RowContext) -> int | None:
        budget = row.params.thinking_budget
        if budget is None:
            return None
        prompt, output = row.prompt_ids, row.output_ids
        total = len(prompt) + len(output)
        state = self.scan(row.think_state, prompt, output)
        assert state.consumed == total, "think_state covers more tokens than the row's history"
        if state.open_start is None or total - state.open_start - 1 < budget:
            return None
        if len(output) == 0 or int(output[-1]) != self.newline_id:
            return self.newline_id
        return self.think_end_id

    def scan(self, state: ThinkState | None, prompt: Sequence[int], output: Sequence[int]) -> ThinkState:
        """`state` (None: nothing scanned yet) advanced over the rest of prompt + output."""
        state = state or ThinkState()
        if state.consumed < len(prompt):
            state = self.advance(state, prompt[state.consumed:])
        return self.advance(state, output[state.consumed - len(prompt):])

    def may_force(self, budget: int, state: ThinkState, total: int) -> bool:
        """Whether a row may get a forced token when it samples with `total` history tokens (prompt +
        output), knowing them only through `state` (which covers state.consumed <= total of them; the
        rest are unknown, e.g. a token still being sampled on the device). False means no history the
        unknown tokens can make gives a force, so the row can skip this processor."""
        if state.open_start is not None:  # open block: at most this long, if no unknown token closes it
            return total - state.open_start - 1 >= budget
        # no open block: an unknown token could open one, the last possible giving length 0
        return total > state.consumed and budget <= 0

    def apply(self, logits: torch.Tensor, rows: Sequence[RowContext]) -> torch.Tensor:
        """logits: [R, V] float; forced rows become -inf except 0 at the forced token (in place)."""
        forced = [(i, tok) for i, row in enumerate(rows) if (tok := self.forced_token(row)) is not None]
        if forced:
            idx = torch.tensor(forced, dtype=torch.long).to(logits.device)  # [F, 2]
            logits[idx[:, 0]] = float("-inf")
            logits[idx[:, 0], idx[:, 1]] = 0.0
        return logits


class ForcedPrefix:
    """tool_choice "required" / a named tool without a grammar (params.forced_prefix, e.g.
    "<tool_call>" + the name's tokens): once the reasoning is over, the answer must begin with the
    prefix, one newline allowed before it. The reasoning is over at once unless `reasoning_first`;
    then at the first `</think>` of the output, or where the output itself starts the prefix (GLM's
    parser also ends reasoning at "<tool_call>"). After the prefix the row is free again."""

    def __init__(self, think_end_id: int | None, newline_id: int | None) -> None:
        self.think_end_id = think_end_id
        self.newline_id = newline_id

    def allowed(self, row: RowContext) -> tuple[int, ...]:
        """The tokens the row may sample now (() = no constraint)."""
        prefix = row.params.forced_prefix
        if not prefix:
            return ()
        out = _as_list(row.output_ids)
        if row.params.reasoning_first:
            ends = [i for i in (_first_index(out, self.think_end_id), _first_index(out, prefix[0])) if i >= 0]
            if not ends:
                return ()  # still reasoning
            end = min(ends)
            out = out[end + 1:] if out[end] == self.think_end_id else out[end:]
        newline_used = bool(out) and out[0] == self.newline_id
        answer = out[1:] if newline_used else out
        if len(answer) >= len(prefix) or answer != list(prefix[:len(answer)]):
            return ()  # the prefix is complete (or, never when enforced, left behind)
        nxt = prefix[len(answer)]
        return (nxt,) if answer or newline_used or self.newline_id is None else (nxt, self.newline_id)

    def apply(self, logits: torch.Tensor, rows: Sequence[RowContext]) -> torch.Tensor:
        """logits: [R, V]; constrained rows keep only their allowed tokens' logits (in place)."""
        for i, row in enumerate(rows):
            allowed = self.allowed(row)
            if allowed:
                keep = torch.tensor(allowed, dtype=torch.long).to(logits.device)
                kept = logits[i, keep].clone()
                logits[i] = float("-inf")
                logits[i, keep] = kept
        return logits


def apply_processors(
    logits: torch.Tensor,  # [R, V] fp32, modified in place
    rows: Sequence[RowContext],
    budget: ThinkingBudget | None,
    *,
    eos_token_ids: Sequence[int] = (),
    forced: ForcedPrefix | None = None,
) -> torch.Tensor:
    """Apply every processor of every row; returns `logits` (modified in place)."""
    assert logits.dim() == 2 and logits.shape[0] == len(rows), "one RowContext per logits row"
    apply_penalties(logits, rows)
    apply_logit_bias(logits, rows)
    apply_min_tokens(logits, rows, eos_token_ids)
    if budget is not None:
        budget.apply(logits, rows)
    if forced is not None:
        forced.apply(logits, rows)
    return logits


def fill_grammar_bitmask(bitmask: torch.Tensor, rows: Sequence[RowContext]) -> int:
    """Write into bitmask[i] (int32 [R, ceil(V/32)] on the CPU, all ones on entry) the tokens row i's
    grammar allows after the row's history, for every row whose request has a grammar; returns how
    many rows the grammar constrained. A row whose request asks for a grammar but carries no compiled
    state is an error, never an unconstrained row."""
    by_request: dict[int, tuple[GrammarState, list[tuple[int, list[int]]]]] = {}
    for i, r in enumerate(rows):
        if r.params.grammar is None:
            continue
        if r.grammar is None:
            raise RuntimeError(f"row {i} asks for a grammar ({r.params.grammar.kind}) but has no grammar state")
        by_request.setdefault(id(r.grammar), (r.grammar, []))[1].append((i, _as_list(r.output_ids)))
    from common.grammar.state import fill_states  # only where a row has a grammar

    # the rows of one request (EAGLE verify rows) in one walk over their shared path prefixes, the
    # requests' walks side by side so each round's masks are filled in one batched call
    return fill_states(bitmask, list(by_request.values()))


def apply_penalties(logits: torch.Tensor, rows: Sequence[RowContext]) -> torch.Tensor:
    rep_rows = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if rep_rows:
        seen = _occurrences(logits, rep_rows, [(rows[i].prompt_ids, rows[i].output_ids) for i in rep_rows]) > 0
        penalty = _row_values(logits, [rows[i].params.repetition_penalty for i in rep_rows])  # [r, 1]
        sub = logits[rep_rows]  # [r, V]
        scaled = torch.where(sub > 0, sub / penalty, sub * penalty)
        logits[rep_rows] = torch.where(seen, scaled, sub)
    add_rows = [
        i for i, r in enumerate(rows) if r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0
    ]
    if add_rows:
        counts = _occurrences(logits, add_rows, [(rows[i].output_ids,) for i in add_rows])  # [a, V]
        freq = _row_values(logits, [rows[i].params.frequency_penalty for i in add_rows])
        pres = _row_values(logits, [rows[i].params.presence_penalty for i in add_rows])
        logits[add_rows] -= counts * freq + (counts > 0).to(logits.dtype) * pres
    return logits


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[RowContext]) -> torch.Tensor:
    pairs = [(i, tok, b) for i, r in enumerate(rows) for tok, b in r.params.logit_bias.items()]
    if pairs:
        idx = torch.tensor([(i, t) for i, t, _ in pairs], dtype=torch.long).to(logits.device)
        bias = torch.tensor([b for _, _, b in pairs], dtype=logits.dtype).to(logits.device)
        logits.index_put_((idx[:, 0], idx[:, 1]), bias, accumulate=True)
    return logits


def apply_min_tokens(
    logits: torch.Tensor, rows: Sequence[RowContext], eos_token_ids: Sequence[int]
) -> torch.Tensor:
    pairs: list[tuple[int, int]] = []
    for i, r in enumerate(rows):
        if len(r.output_ids) < r.params.min_tokens:
            banned = set(r.params.stop_token_ids)
            if not r.params.ignore_eos:
                banned.update(eos_token_ids)
            pairs.extend((i, t) for t in banned)
    if pairs:
        idx = torch.tensor(pairs, dtype=torch.long).to(logits.device)
        logits[idx[:, 0], idx[:, 1]] = float("-inf")
    return logits


def _occurrences(
    logits: torch.Tensor, row_ids: list[int], histories: list[tuple[Sequence[int] | torch.Tensor, ...]]
) -> torch.Tensor:
    """[len(row_ids), V] counts of each token in each selected row's histories (one scatter)."""
    device = logits.device
    parts, owners = [], []
    for j, hist in enumerate(histories):
        for seq in hist:
            t = _as_index_tensor(seq, device)
            parts.append(t)
            owners.append(torch.full_like(t, j))
    counts = torch.zeros(len(row_ids), logits.shape[1], dtype=logits.dtype, device=device)
    if parts:
        tok, own = torch.cat(parts), torch.cat(owners)
        counts.index_put_((own, tok), torch.ones_like(tok, dtype=logits.dtype), accumulate=True)
    return counts


def _row_values(logits: torch.Tensor, values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=logits.dtype).to(logits.device)[:, None]


def _as_index_tensor(seq: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(seq, torch.Tensor):
        return seq.to(device=device, dtype=torch.long).reshape(-1)
    return torch.tensor(list(seq), dtype=torch.long).to(device)


def _as_list(seq: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(seq, torch.Tensor):
        return seq.reshape(-1).tolist()
    return seq if isinstance(seq, list) else list(seq)


def _first_index(seq: list[int], value: int | None) -> int:
    """Index of the first occurrence of value in seq, -1 if absent (or value is None)."""
    try:
        return seq.index(value) if value is not None else -1
    except ValueError:
        return -1


def _last_index(seq: list[int], value: int) -> int:
    """Index of the last occurrence of value in seq, -1 if absent (C-speed search)."""
    try:
        return len(seq) - 1 - seq[::-1].index(value)
    except ValueError:
        return -1
