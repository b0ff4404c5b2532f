"""EAGLE speculative decoding with the checkpoint's MTP layer as the draft (specs/eagle.md §4.2).

One step for a batch of requests, each with target KV length L, pending token b (the root) and
a DraftState (top-k after b, draft hidden at slot L-1):

  draft:  S-1 MTP forwards over the k frontier nodes, exact ancestor masks over draft scratch
          slots L + level*k + j (RoPE position L + level)
  tree:   the N-1 best candidates under the root b
  verify: one target forward over the N nodes (node j -> slot L+j, position L+depth(j))
  accept: processors on every node row with that row's own history (prompt + output + path),
          then greedy walk or lossless target-only tree sampling
  commit: tokens one at a time with stop checks; accepted KV compacted to slots L..L+a
  extend: one MTP forward over the a+1 committed tokens (slots L..L+a) -> next DraftState
"""

from __future__ import annotations

import torch

from common import metrics
from common.batch import ForwardBatch, SeqSpec
from common.config import SpecConfig
from common.runtime.draft import DraftState, draft_states
from common.runtime.runner import ModelRunner
from common.runtime.token_sampler import TokenSampler
from common.sampling.logit_processors import RowContext
from common.sampling.sampler import draw_uniforms
from decode_worker.commit import StopRules, commit_tokens
from decode_worker.scheduler import DecodeReq
from decode_worker.spec.tree import DraftFrontier, VerifyTree, select_tree
from decode_worker.spec.verify import VerifyResult, verify_greedy, verify_sampling
from decode_worker.steps import rebuild_kv


class EagleStepper:
    def __init__(self, runner: ModelRunner, sampler: TokenSampler, rules: StopRules, spec: SpecConfig) -> None:
        self.runner = runner
        self.sampler = sampler
        self.rules = rules
        self.S, self.k, self.N = spec.num_steps, spec.eagle_topk, spec.num_draft_tokens

    # ------------------------------------------------------------------ state entry points
    def on_kv_arrival(self, req: DecodeReq, aux) -> None:
        dev = self.runner.device
        req.draft = DraftState(
            topk_p=torch.as_tensor(aux.topk_p, dtype=torch.float32, device=dev),
            topk_idx=torch.as_tensor(aux.topk_idx, dtype=torch.int64, device=dev),
            hidden=aux.hidden.to(device=dev, dtype=self.runner.dtype),
        )

    def recompute(self, req: DecodeReq) -> None:
        history, hidden = rebuild_kv(self.runner, req)
        req.draft = self._draft_extend([req], [history[1:] + [req.pending]], [0], hidden)[0]

    # ------------------------------------------------------------------ the step
    def step(self, reqs: list[DecodeReq]) -> None:
        L = [r.kv_len for r in reqs]
        tree = self._draft(reqs, L)
        logits, hidden = self._verify_forward(reqs, L, tree)
        result = self._accept(reqs, tree, logits)
        committed, accept_idx = self._read_result(result)
        self._compact_kv(reqs, L, accept_idx)
        logprob_rows = torch.log_softmax(logits, -1) if any(r.params.logprobs for r in reqs) else None
        extend_reqs, extend_tokens, extend_start, extend_rows = [], [], [], []
        for b, req in enumerate(reqs):
            a = len(committed[b]) - 1
            n = commit_tokens(req, committed[b], self.rules)
            req.verify_steps += 1
            req.accepted_drafts += min(a, n - 1) if req.finish else a
            metrics.spec_accept_length().observe(a + 1)  # tokens this verify gave this request
            if logprob_rows is not None and req.params.logprobs:
                for d in range(n):
                    row = logprob_rows[b * self.N + accept_idx[b][d]]
                    req.logprobs.append((committed[b][d], float(row[committed[b][d]]), self._top(row, req)))
            req.kv_len = L[b] + a + 1
            if req.finish is None:
                extend_reqs.append(req)
                extend_tokens.append(committed[b])
                extend_start.append(L[b])
                extend_rows.extend(b * self.N + j for j in accept_idx[b][: a + 1])
        if extend_reqs:
            rows = torch.tensor(extend_rows, device=hidden.device)
            for req, state in zip(extend_reqs, self._draft_extend(extend_reqs, extend_tokens, extend_start,
                                                                   hidden[rows])):
                req.draft = state

    # ------------------------------------------------------------------ phases
    def _draft(self, reqs: list[DecodeReq], L: list[int]) -> VerifyTree:
        k, dev = self.k, self.runner.device
        frontier = DraftFrontier(torch.stack([r.draft.topk_p for r in reqs]),
                                 torch.stack([r.draft.topk_idx for r in reqs]))
        hidden = torch.stack([r.draft.hidden for r in reqs]).repeat_interleave(k, dim=0)  # [B*k, H]
        B, pages = len(reqs), [r.pages for r in reqs]
        for level in range(self.S - 1):
            # frontier node j (position L + level) writes scratch slot L + level*k + j; no host copy
            depth = torch.full((B, k), level, dtype=torch.int64, device=dev)
            batch = ForwardBatch.tree(frontier.tokens, depth, frontier.attention_mask(), L, pages,
                                      self.runner.page_size)
            logits, h_out = self.runner.draft_step_forward(batch, hidden)  # a graph replay when one fits
            child_p, child_idx = torch.softmax(logits, -1).topk(k, dim=-1)  # [B*k, k]
            parent_slot = frontier.expand(child_p.view(B, k, k), child_idx.view(B, k, k))  # [B, k]
            h = h_out.view(B, k, -1)
            hidden = h.gather(1, parent_slot[:, :, None].expand(B, k, h.shape[-1])).reshape(B * k, -1)
        scores, tokens, parents = frontier.candidates()
        roots_and_lens = torch.tensor([[r.pending for r in reqs], L], device=dev)  # one host->device copy
        return select_tree(scores, tokens, parents, self.N, roots_and_lens[0], roots_and_lens[1])

    def _verify_forward(self, reqs: list[DecodeReq], L: list[int], tree: VerifyTree):
        """Target forward over the N tree nodes (node j -> slot L+j, position L+depth(j)); the tree stays on
        the device. Returns (logits [B*N, V], hidden [B*N, H]): a graph replay when one fits."""
        batch = ForwardBatch.tree(tree.tokens, tree.depth, tree.mask, L, [r.pages for r in reqs],
                                  self.runner.page_size)
        return self.runner.verify_forward(batch)

    def _accept(self, reqs: list[DecodeReq], tree: VerifyTree, logits: torch.Tensor) -> VerifyResult:
        """Processors on every node row with its own history, then the acceptance rule."""
        B, N = len(reqs), self.N
        parents, tokens = torch.stack((tree.parents, tree.tokens)).tolist()  # one device->host copy
        rows = []
        for b, req in enumerate(reqs):
            paths: list[list[int]] = []
            for j in range(N):
                p = parents[b][j]
                paths.append([] if p < 0 else paths[p] + [tokens[b][j]])
                rows.append(RowContext(req.params, req.prompt_ids, req.output_ids + paths[j]))
        self.sampler.process(logits, rows)
        if all(r.params.is_greedy for r in reqs):
            return verify_greedy(tree, logits.argmax(-1).view(B, N), self.S)
        params = [r.params for r in reqs for _ in range(N)]
        probs = self.sampler.probs(logits, params).view(B, N, -1)
        u = draw_uniforms([r.params.seed for r in reqs], [len(r.output_ids) for r in reqs], N + 1,
                          logits.device, self.sampler.generator)
        return verify_sampling(tree, probs, u, self.S)

    @staticmethod
    def _read_result(result: VerifyResult) -> tuple[list[list[int]], list[list[int]]]:
        """(committed tokens, accepted node path) per request, both a+1 long, in one device->host copy."""
        width = result.committed.shape[1]
        host = torch.cat((result.committed, result.accept_index, result.num_accepted[:, None]), dim=1).tolist()
        return ([row[: row[-1] + 1] for row in host], [row[width: width + row[-1] + 1] for row in host])

    def _compact_kv(self, reqs: list[DecodeReq], L: list[int], accept_idx: list[list[int]]) -> None:
        """Move the accepted path's K/V to slots L..L+a: path node d (slot L + accept_idx[b][d]) goes to
        slot L + d (decode_worker.spec.verify.accepted_kv_moves, from the host copy of the path)."""
        if self.k == 1:
            return  # a chain's accepted nodes already sit at L..L+a
        page = self.runner.kv_pool.page_size
        src, dst = [], []
        for b, path in enumerate(accept_idx):
            pages = reqs[b].pages
            for d, j in enumerate(path):
                if j != d:
                    s, t = L[b] + j, L[b] + d
                    src.append(pages[s // page] * page + s % page)
                    dst.append(pages[t // page] * page + t % page)
        if not src:
            return
        pool = self.runner.kv_pool
        slots = torch.tensor([src, dst], device=pool.device)
        pool.copy_slots(slots[0], slots[1])

    def _draft_extend(self, reqs: list[DecodeReq], tokens: list[list[int]], starts: list[int],
                      hidden_in: torch.Tensor) -> list[DraftState]:
        """MTP forward over each request's tokens at slots/positions start.. -> next DraftState.
        hidden_in [sum of token counts, H]: the target hidden of each token, requests in order."""
        seqs = [SeqSpec(t, range(s, s + len(t)), seq_len=s + len(t), pages=r.pages)
                for r, t, s in zip(reqs, tokens, starts)]
        batch = ForwardBatch.build(seqs, self.runner.page_size, self.runner.device)
        logits, h_out = self.runner.draft_forward(batch, hidden_in)
        last = batch.query_start[1:].long() - 1
        return draft_states(logits, h_out[last], self.k)

    @staticmethod
    def _top(row: torch.Tensor, req: DecodeReq) -> list[tuple[int, float]]:
        if req.params.top_logprobs <= 0:
            return []
        vals, ids = row.topk(req.params.top_logprobs)
        return list(zip(ids.tolist(), vals.tolist()))
