"""The plain (non-speculative) decode step, and KV recompute for retracted requests.

One step: every running request feeds its pending token at position kv_len, writes its K/V at
logical slot kv_len, and samples the next token with its own processors and history. `step` does it
synchronously; `launch` enqueues it without waiting for the device, taking the input of a request
with a token in flight from the previous launched step's device tensor (decode_worker/overlap.py).
"""

from __future__ import annotations

import torch

from common.forward.batch import ForwardBatch, SeqSpec
from common.runtime.runner import ModelRunner
from common.sampling.logit_processors import RowContext, ThinkState
from common.sampling.token_sampler import TokenSampler
from decode_worker.commit import StopRules, commit_tokens
from decode_worker.overlap import LaunchedStep, feed_tokens
from decode_worker.scheduler import DecodeReq


def record_logprob(req: DecodeReq, row) -> None:
    if req.params.logprobs:
        req.logprobs.append((row.token, row.logprob, row.top))


def extend_kv(runner: ModelRunner, req: DecodeReq, tokens: list[int], start: int, logits_at_end: bool = False,
              chunk: int = 512) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Compute the target KV of tokens[start:] (positions start..n-1; [0, start) is in the request's
    pages already, from its prefix cache) and set kv_len = n. Returns the logits of the last token
    when asked, and the post-norm hidden states [n - start, H] (the MTP draft's input)."""
    hiddens, logits = [], None
    for lo in range(start, len(tokens), chunk):
        hi = min(lo + chunk, len(tokens))
        last = logits_at_end and hi == len(tokens)
        spec = SeqSpec(tokens[lo:hi], range(lo, hi), seq_len=hi, pages=req.pages,
                       logit_rows=[hi - lo - 1] if last else [])
        out, hidden = runner.forward(ForwardBatch.build([spec], runner.page_size, runner.device))
        hiddens.append(hidden)
        if last:
            logits = out
    req.kv_len = len(tokens)
    return logits, torch.cat(hiddens)


def rebuild_kv(runner: ModelRunner, req: DecodeReq) -> tuple[list[int], torch.Tensor]:
    """Recompute a retracted request's target KV (prompt + committed outputs but the pending one,
    positions cached_len..n-1: its cached prefix came back at re-admission) into its pages and set
    kv_len. Returns that history and the hidden states [n - cached_len, H] of the positions computed."""
    tokens = req.history()
    return tokens, extend_kv(runner, req, tokens, req.cached_len)[1]


def prefill_suffix(runner: ModelRunner, sampler: TokenSampler, rules: StopRules, req: DecodeReq) -> torch.Tensor:
    """The prefill leg on this worker: the prompt's KV after its cached prefix, then the first token,
    sampled as the prefill worker samples it and committed as its KV record would be. Returns the
    hidden states of the positions computed."""
    logits, hidden = extend_kv(runner, req, req.prompt_ids, req.cached_len, logits_at_end=True)
    row = sampler.sample(logits, [RowContext(req.params, req.prompt_ids, [], grammar=req.grammar)])[0]
    commit_tokens(req, [row.token], rules)
    if req.params.logprobs:
        req.logprobs.append((row.token, row.logprob or 0.0, []))
    return hidden


class PlainStepper:
    def __init__(self, runner: ModelRunner, sampler: TokenSampler, rules: StopRules) -> None:
        self.runner = runner
        self.sampler = sampler
        self.rules = rules

    def step(self, reqs: list[DecodeReq]) -> None:
        runner = self.runner
        batch = ForwardBatch.decode([r.pending for r in reqs], [r.kv_len for r in reqs], [r.pages for r in reqs],
                                    runner.page_size, runner.device)
        logits = runner.decode_logits(batch)  # a CUDA graph replay when one was captured
        rows = self.sampler.sample(logits, [self._row(r) for r in reqs])
        for req, row in zip(reqs, rows):
            req.kv_len += 1
            commit_tokens(req, [row.token], self.rules)
            record_logprob(req, row)

    def can_launch(self, req: DecodeReq, step: int) -> bool:
        """Whether `launch` gives req the tokens `step` would, sampling output position `step`."""
        return not self.sampler.needs_host(req.params, step, self._think(req))

    def _row(self, req: DecodeReq) -> RowContext:
        think = self._think(req)  # the cached scan spares the budget a rescan of the whole history
        return RowContext(req.params, req.prompt_ids, req.output_ids, think[0] if think else None, req.grammar)

    def _think(self, req: DecodeReq) -> tuple[ThinkState, int] | None:
        """(the request's thinking-budget scan over prompt + committed outputs, prompt length), advanced
        incrementally and cached on the request; None without a budget."""
        budget = self.sampler.budget
        if req.params.thinking_budget is None or budget is None:
            return None
        req.think_state = budget.scan(req.think_state, req.prompt_ids, req.output_ids)
        return req.think_state, len(req.prompt_ids)

    def launch(self, reqs: list[DecodeReq], prev: LaunchedStep | None) -> LaunchedStep:
        """Enqueue one step (forward + device sampling + token copy to the host) and return at once.
        A request in `prev` feeds prev's token for it; the others their host pending token. Every
        request's kv_len counts the slot written; its token is committed by the caller later."""
        runner = self.runner
        src = [prev.rows.get(r, -1) if prev is not None else -1 for r in reqs]  # row of prev feeding r
        batch = ForwardBatch.decode([r.pending if s < 0 else 0 for r, s in zip(reqs, src)],
                                    [r.kv_len for r in reqs], [r.pages for r in reqs], runner.page_size,
                                    runner.device)
        if prev is not None:
            feed_tokens(batch.input_ids, prev.tokens, src)
        logits = runner.decode_logits(batch)
        steps = [len(r.output_ids) + (s >= 0) for r, s in zip(reqs, src)]
        tokens = self.sampler.sample_on_device(logits, [r.params for r in reqs], steps)
        for req in reqs:
            req.kv_len += 1
        return LaunchedStep.start(reqs, tokens)

    def on_kv_arrival(self, req: DecodeReq, aux: object) -> None:
        pass

    def recompute(self, req: DecodeReq) -> None:
        rebuild_kv(self.runner, req)

    def prefill_local(self, req: DecodeReq) -> None:
        prefill_suffix(self.runner, self.sampler, self.rules, req)
