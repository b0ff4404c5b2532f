"""EAGLE speculative decoding with the checkpoint's MTP layer as the draft (docs/speculative.md §4).

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

Host/device split: lengths, pages and roots go to the device in one copy (TreeLayout); the tree,
acceptance, KV compaction and the extend's inputs stay there; the step reads back one packed tensor
(committed tokens, accepted path, accept counts) and only then runs the per-request commit. The
extend is queued before that read, so the host commits while the device extends.

The extend has a fixed shape (SGLang's CUDA-graph draft extend): W = S+1 queries per request (the
accepted path a+1 never exceeds S+1) over window slots L..L+S, causal, positions L..L+S, tokens =
the committed path, hidden = the target hidden of the accepted nodes, both padded by repeating the
last real one (same MTP input as query a, so the padding mostly picks query a's experts instead of
loading others). The next DraftState is read at query a. The padded queries a+1..S write draft KV
into slots L+a+1..L+S, which hold nothing real: after the step the request's length is L' = L+a+1, so
they are slots >= L' -- the next step's draft scratch. Nothing reads a draft slot >= L' before the
next step writes it: draft level l attends to the prefix [0, L') and to its window columns
L' + l'*k + j (l' <= l), each written by level l' of that same step before level l runs (a forward
stores its own K/V before attending), and the next extend again reads only [0, L') plus its own
causal window. Real queries never see padded slots (causal: query i <= a sees slots <= L+i). The
pages are there: the scheduler reserves SpecConfig.step_slots = max(N, (S-1)k, S+1) slots past kv_len.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.forward.batch import ForwardBatch, SeqSpec, TreeLayout, to_device
from common.model.config import SpecConfig
from common.runtime.draft import DraftBatch, DraftState, draft_states, draft_topk, stack_states
from common.runtime.runner import ModelRunner
from common.sampling.logit_processors import RowContext
from common.sampling.sampler import SamplingTensors, draw_uniforms, target_probs, uses_filter
from common.sampling.token_sampler import TokenSampler
from common.serving import metrics
from decode_worker.commit import StopRules, commit_tokens
from decode_worker.scheduler import DecodeReq
from decode_worker.spec.tree import DraftFrontier, VerifyTree, chain_tree, select_tree
from decode_worker.spec.verify import VerifyResult, verify_greedy, verify_greedy_chain, verify_sampling
from decode_worker.steps import prefill_suffix, rebuild_kv


@dataclass(frozen=True)
class _Consts:
    """Device constants of one batch size."""

    level_depth: list[torch.Tensor]  # per draft level: [B, k] int64 = level
    chain_mask: list[torch.Tensor]  # per draft level (k = 1): [B, 1, level+1] bool, all visible
    extend_depth: torch.Tensor  # [B, W] int64 0..W-1
    extend_mask: torch.Tensor  # [B, W, W] bool causal (contiguous: the batch's flat mask is a view)
    extend_base: torch.Tensor  # [B] int64 b*W: flat row of request b's first extend query


class EagleStepper:
    def __init__(self, runner: ModelRunner, sampler: TokenSampler, rules: StopRules, spec: SpecConfig) -> None:
        self.runner = runner
        self.sampler = sampler
        self.rules = rules
        self.S, self.k, self.N = spec.num_steps, spec.eagle_topk, spec.num_draft_tokens
        self.chain = self.k == 1 and self.N == self.S + 1  # the tree is always b -> d1 -> ... -> dS
        self.width = self.S + 1  # W: the fixed extend's queries (an accepted path has at most S+1 tokens)
        # slots one step may write past L: the verify tree, the draft scratch, the extend (= step_slots)
        self.window = max(self.N, (self.S - 1) * self.k, self.width)
        self._consts: dict[int, _Consts] = {}

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
        start = req.cached_len
        req.draft = self._extend_varlen([req], [history[start + 1:] + [req.pending]], [start], hidden)[0]

    def prefill_local(self, req: DecodeReq) -> None:
        """The prompt suffix and first token (steps.prefill_suffix), then the MTP draft extend over the
        same positions -- slot p takes (h_p, t_{p+1}), the last one the first token -- as on prefill."""
        hidden = prefill_suffix(self.runner, self.sampler, self.rules, req)
        start = req.cached_len
        req.draft = self._extend_varlen([req], [req.prompt_ids[start + 1:] + [req.pending]], [start], hidden)[0]

    # ------------------------------------------------------------------ the step
    def step(self, reqs: list[DecodeReq]) -> None:
        L = [r.kv_len for r in reqs]
        layout, state = self._layout(reqs)
        tree = self._draft(layout, state)
        batch = ForwardBatch.tree_in(layout, tree.tokens, tree.depth, tree.mask)
        logits, hidden = self.runner.verify_forward(batch)  # [B*N, V], [B*N, H]: a graph replay when one fits
        result = self._accept(reqs, tree, logits)
        self._compact_kv(layout, result)
        packed = torch.cat((result.committed, result.accept_index, result.num_accepted[:, None]), dim=1)
        host = _HostCopy(packed)  # the step's one device->host read, not waited for yet
        draft = self._draft_extend(layout, result, hidden)  # queued before the read completes
        rows = host.wait()
        width = self.width
        logprob_rows = torch.log_softmax(logits, -1) if any(r.params.logprobs for r in reqs) else None
        observe = metrics.spec_accept_length().observe
        for b, req in enumerate(reqs):
            row = rows[b]
            a = row[-1]
            committed = row[:a + 1]
            n = commit_tokens(req, committed, self.rules)
            req.verify_steps += 1
            req.accepted_drafts += min(a, n - 1) if req.finish else a
            observe(a + 1)  # tokens this verify gave this request
            if logprob_rows is not None and req.params.logprobs:
                for d in range(n):
                    lp = logprob_rows[b * self.N + row[width + d]]
                    req.logprobs.append((committed[d], float(lp[committed[d]]), self._top(lp, req)))
            req.kv_len = L[b] + a + 1
            if req.finish is None:
                req.draft = DraftState.of(draft, b)

    # ------------------------------------------------------------------ phases
    def _layout(self, reqs: list[DecodeReq]) -> tuple[TreeLayout, DraftBatch]:
        """The step's TreeLayout (roots in its extra row 0) and the requests' stacked draft states, with
        one host->device copy: a previous step's DraftBatch is reused whole, or gathered by rows that
        travel in the layout's copy."""
        drafts = [r.draft for r in reqs]
        first = drafts[0].batch
        rows = [d.row for d in drafts]
        extra = [[r.pending for r in reqs]]
        gather = (all(d.batch is first for d in drafts)
                  and (len(rows) != first.topk_p.shape[0] or rows != list(range(len(rows)))))
        if gather:
            extra.append(rows)
        runner = self.runner
        layout = TreeLayout.build([r.kv_len for r in reqs], [r.pages for r in reqs], self.window,
                                  runner.page_size, runner.device, extra=extra)
        return layout, stack_states(drafts, layout.extra[1] if gather else None)

    def _consts_for(self, n: int, device: torch.device) -> _Consts:
        c = self._consts.get(n)
        if c is None:
            k, w, levels = self.k, self.width, range(self.S)
            c = _Consts(
                level_depth=[torch.full((n, k), lv, dtype=torch.int64, device=device) for lv in levels],
                chain_mask=[torch.ones((n, 1, lv + 1), dtype=torch.bool, device=device) for lv in levels],
                extend_depth=torch.arange(w, device=device).expand(n, w),
                extend_mask=torch.ones((w, w), dtype=torch.bool, device=device).tril().expand(n, w, w).contiguous(),
                extend_base=torch.arange(n, device=device) * w,
            )
            self._consts[n] = c
        return c

    def _draft(self, layout: TreeLayout, state: DraftBatch) -> VerifyTree:
        k, B = self.k, layout.num_seqs
        c = self._consts_for(B, state.topk_idx.device)
        roots = layout.extra[0]
        if self.chain:  # no frontier bookkeeping, the tree's shape is fixed (tree.chain_tree)
            tokens, hidden = [state.topk_idx], state.hidden
            for level in range(self.S - 1):
                # the level's node (position L + level) writes scratch slot L + level
                batch = ForwardBatch.tree_in(layout, tokens[-1], c.level_depth[level], c.chain_mask[level])
                logits, hidden = self.runner.draft_step_forward(batch, hidden)  # a graph replay when one fits
                tokens.append(logits.argmax(dim=-1, keepdim=True))  # the chain's next node (draft_topk's k = 1 id)
            return chain_tree(torch.cat(tokens, dim=1), roots, layout.prefix)
        frontier = DraftFrontier(state.topk_p, state.topk_idx)
        hidden = state.hidden.repeat_interleave(k, dim=0)  # [B*k, H]
        for level in range(self.S - 1):
            # frontier node j (position L + level) writes scratch slot L + level*k + j; no host copy
            mask = frontier.attention_mask()
            batch = ForwardBatch.tree_in(layout, frontier.tokens, c.level_depth[level], mask)
            logits, h_out = self.runner.draft_step_forward(batch, hidden)  # a graph replay when one fits
            child_p, child_idx = draft_topk(logits, k)  # [B*k, k]
            parent_slot = frontier.expand(child_p.view(B, k, k), child_idx.view(B, k, k))  # [B, k]
            h = h_out.view(B, k, -1)
            hidden = h.gather(1, parent_slot[:, :, None].expand(B, k, h.shape[-1])).reshape(B * k, -1)
        scores, tokens, parents = frontier.candidates()
        return select_tree(scores, tokens, parents, self.N, roots, layout.prefix)

    def _accept(self, reqs: list[DecodeReq], tree: VerifyTree, logits: torch.Tensor) -> VerifyResult:
        """Processors on every node row with its own history (only the requests that have one active),
        then the acceptance rule."""
        B, N = len(reqs), self.N
        sampler = self.sampler
        active = [b for b, r in enumerate(reqs) if sampler.processors_active(r.params, len(r.output_ids))]
        if active:
            self._process(reqs, active, tree, logits)
        if all(r.params.is_greedy for r in reqs):
            target = logits.argmax(-1).view(B, N)
            if self.chain:
                return verify_greedy_chain(tree, target, self.S)
            return verify_greedy(tree, target, self.S)
        params = [r.params for r in reqs]
        st = SamplingTensors.from_params(params, logits.device, repeat=N)
        probs = target_probs(logits, *st, filtered=uses_filter(params, logits.shape[1])).view(B, N, -1)
        u = draw_uniforms([p.seed for p in params], [len(r.output_ids) for r in reqs], N + 1, "cpu",
                          self.sampler.generator)
        return verify_sampling(tree, probs, to_device(u, logits.device), self.S)

    def _process(self, reqs: list[DecodeReq], active: list[int], tree: VerifyTree,
                 logits: torch.Tensor) -> None:
        """Processors on the N rows of each active request, row j with history output + path to node j.
        Rows of the other requests are left alone (no processor would change them)."""
        B, N = len(reqs), self.N
        dev = logits.device
        sel = torch.stack((tree.parents, tree.tokens), dim=1)  # [B, 2, N]
        if len(active) < B:
            sel = sel.index_select(0, to_device(torch.tensor(active), dev))
        host = sel.tolist()  # one device->host copy of the active trees
        rows = []
        for (parents, tokens), b in zip(host, active):
            req = reqs[b]
            paths: list[list[int]] = []
            for j in range(N):
                p = parents[j]
                paths.append([] if p < 0 else paths[p] + [tokens[j]])
                rows.append(RowContext(req.params, req.prompt_ids, req.output_ids + paths[j], grammar=req.grammar))
        if len(active) == B:
            self.sampler.process(logits, rows)
            return
        idx = to_device((torch.tensor(active)[:, None] * N + torch.arange(N)).reshape(-1), dev)
        sub = logits.index_select(0, idx)
        self.sampler.process(sub, rows)
        logits.index_copy_(0, idx, sub)

    def _compact_kv(self, layout: TreeLayout, result: VerifyResult) -> None:
        """Move the accepted path's K/V to slots L..L+a: path node d (slot L + accept_index[b, d]) goes to
        slot L + d, on the device (decode_worker.spec.verify.accepted_kv_moves; positions past a and
        nodes already in place copy onto themselves)."""
        if self.k == 1:
            return  # a chain's accepted nodes already sit at L..L+a
        w = result.accept_index.shape[1]
        d = torch.arange(w, device=result.accept_index.device)[None, :]
        node = torch.where(d <= result.num_accepted[:, None], result.accept_index, d)  # [B, W]
        src = layout.window_slots.gather(1, node)
        self.runner.copy_kv_slots(src.reshape(-1), layout.window_slots[:, :w].reshape(-1))

    def _draft_extend(self, layout: TreeLayout, result: VerifyResult, hidden: torch.Tensor) -> DraftBatch:
        """The fixed-shape draft extend (module docstring): W queries per request at slots/positions
        L..L+S, the next DraftState at query a. hidden [B*N, H]: the verify's target hidden."""
        B, W = layout.num_seqs, self.width
        c = self._consts_for(B, hidden.device)
        last = torch.minimum(c.extend_depth, result.num_accepted[:, None])  # [B, W] 0..a, then a again
        tokens = result.committed.gather(1, last)  # the committed path, its last token repeated
        nodes = result.accept_index.gather(1, last)  # the accepted nodes, the last one repeated
        h = hidden.view(B, self.N, -1)
        h_in = h.gather(1, nodes[:, :, None].expand(B, W, h.shape[-1])).reshape(B * W, -1)
        batch = ForwardBatch.tree_in(layout, tokens, c.extend_depth, c.extend_mask,
                                     logit_rows=c.extend_base + result.num_accepted)
        p, idx, g = self.runner.draft_extend_forward(batch, h_in, self.k)  # a graph replay when one fits
        return DraftBatch(p.clone(), idx.clone(), g.clone())  # out of the graph's buffers: kept across steps

    def _extend_varlen(self, reqs: list[DecodeReq], tokens: list[list[int]], starts: list[int],
                       hidden_in: torch.Tensor) -> list[DraftState]:
        """MTP forward over each request's tokens at slots/positions start.. -> next DraftState (eager,
        any lengths: KV rebuilds). hidden_in [sum of token counts, H]: the target hidden of each token."""
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


class _HostCopy:
    """A device tensor's rows as Python lists: on CUDA a non-blocking copy into pinned memory now,
    waited for in `wait()`, so work queued in between overlaps the host's wait."""

    def __init__(self, t: torch.Tensor) -> None:
        self.event = None
        if t.device.type == "cuda":
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = t

    def wait(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()
