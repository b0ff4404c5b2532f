"""Committing sampled tokens to a request, one token at a time, with stop checks after each.

Used by the plain decode step, the EAGLE step (several tokens per step) and KV arrival (the
prefill's first token). Everything after a finishing token is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.transport.aux import AuxRecord
from decode_worker.output import FinishEvent
from decode_worker.scheduler import DecodeReq


class StopRules:
    """Model-level stop ids (generation_config eos) shared by every request."""

    def __init__(self, eos_token_ids: Sequence[int]) -> None:
        self.eos = frozenset(int(t) for t in eos_token_ids)

    def check(self, req: DecodeReq, token: int) -> FinishEvent | None:
        p = req.params
        # min_tokens is enforced by the logit processors (stop ids are masked until then)
        if token in p.stop_token_ids:
            return FinishEvent("stop", token)
        if not p.ignore_eos and token in self.eos:
            return FinishEvent("stop", token)
        if len(req.output_ids) >= p.max_tokens:
            return FinishEvent("length")
        return None


def commit_tokens(req: DecodeReq, tokens: Sequence[int], rules: StopRules) -> int:
    """Append tokens until one finishes the request; returns how many were committed. The request's
    grammar matcher (if any) advances over the committed tokens."""
    committed = 0
    for tok in tokens:
        req.output_ids.append(int(tok))
        committed += 1
        fin = rules.check(req, int(tok))
        if fin is not None:
            req.finish = fin
            break
    if req.grammar is not None:
        req.grammar.advance(req.output_ids)
    return committed


def commit_first_token(req: DecodeReq, aux: AuxRecord, rules: StopRules) -> None:
    """The prefill's KV is in place (kv_len = the prompt) and its first token is the first output."""
    req.kv_len = req.prompt_len
    commit_tokens(req, [aux.first_token], rules)
    if req.params.logprobs:
        req.logprobs.append((aux.first_token, aux.first_logprob, []))
