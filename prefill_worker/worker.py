"""The prefill engine thread.

    inbox -> plan chunks (token budget) -> target forward (finished layer groups stream out as
    they are computed) -> first token -> MTP draft extend (its KV + top-k + hidden) -> aux

KV of one chunk leaves in layer groups: after layer i of a group completes, the group's K/V of
the chunk's tokens is gathered on the compute stream and handed to the pair's sender thread with
a CUDA event, so sending overlaps the remaining layers. The last message of a transfer carries
the aux record. Pages are freed when the sender reports the transfer confirmed (or failed).
A job that starts from cached prefix pages sends their KV (every layer, the MTP layer included)
as its first messages, before its first forward, so it travels while the suffix is computed.
Tokens the decode worker already holds (its prefix cache, `decode_cached`) are never sent: every
message's token range starts at or after them, for every layer and every TP stream alike.
Under tensor parallelism this process gathers its own kv heads, and `fanout` tells the followers
to send theirs of the same chunk (prefill_worker/kv_sender.py, common/worker/tp_kv.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from common.forward.batch import ForwardBatch, SeqSpec
from common.model.config import SpecConfig
from common.runtime.draft import draft_states
from common.runtime.runner import ModelRunner
from common.runtime.step_plan import TPBroken
from common.sampling.logit_processors import RowContext
from common.sampling.token_sampler import TokenSampler
from common.serving import metrics
from common.transport.aux import AuxRecord
from common.worker.engine import EngineThread
from prefill_worker.messages import Abort, Flush, PrefillMsg, Submit, TransferDone
from prefill_worker.scheduler import Chunk, JobState, PrefillJob, PrefillScheduler

log = logging.getLogger(__name__)
# (job, seq, layers, tokens, is_last): the TP followers' part of a chunk this rank just queued
Fanout = Callable[[PrefillJob, int, tuple[int, int], tuple[int, int], bool], None]


class PrefillEngine(EngineThread[PrefillMsg]):
    def __init__(self, runner: ModelRunner, sched: PrefillScheduler, sampler: TokenSampler, spec: SpecConfig,
                 layer_group_size: int = 4, fanout: Fanout | None = None) -> None:
        super().__init__("prefill-engine", sched)
        self.fanout = fanout
        self.runner = runner
        self.sched = sched
        self.sampler = sampler
        self.spec = spec
        self.num_layers = runner.config.num_hidden_layers
        self.group = max(1, layer_group_size)
        self._reported: dict[str, int] = {}  # prefix-cache counter totals already added to the metrics
        self.handle(Submit, self._on_submit)
        self.handle(Abort, self._on_abort)
        self.handle(TransferDone, self._on_transfer_done)
        self.handle(Flush, lambda msg: msg.reply(self.sched.flush_cache()))

    # ------------------------------------------------------------------ other threads
    def submit(self, job: PrefillJob) -> None:
        self.post(Submit(job))

    def abort(self, request_id: str, reason: str = "aborted", only: PrefillJob | None = None) -> None:
        self.post(Abort(request_id, reason, only))

    def flush_cache(self, reply: Callable[[int], None]) -> None:
        """Forget the prefix cache; reply(pages freed) comes from the engine thread."""
        self.post(Flush(reply))

    def transfer_done(self, job: PrefillJob, error: Exception | None) -> None:
        """Sender thread callback: the decode side confirmed (or the transfer failed)."""
        self.post(TransferDone(job, error))

    # ------------------------------------------------------------------ loop
    def run_once(self) -> None:
        busy = any(j.state is JobState.PREFILLING for j in self.sched.active) or bool(self.sched.queue)
        self._drain_inbox(block=not busy)
        self._expire()
        chunks = self.sched.plan()
        self.publish()
        if chunks:
            self._forward(chunks)
            self.last_progress = time.monotonic()
            self.publish()
        self._report()

    def _forward(self, chunks: list[Chunk]) -> None:
        try:
            self._step(chunks)
        except Exception as e:  # fail the batch, never the process (a broken TP group ends it soon after)
            log.exception("prefill step failed")
            for c in chunks:
                self._finish(c.job, e if isinstance(e, TPBroken) else RuntimeError(f"prefill forward failed: {e}"))

    def _on_submit(self, msg: Submit) -> None:
        try:
            self.sched.submit(msg.job)
        except (OverflowError, ValueError) as e:
            msg.job.on_done(msg.job, e)

    def _on_abort(self, msg: Abort) -> None:
        job = self.sched.by_id.get(msg.request_id)
        if job is not None and (msg.only is None or msg.only is job):
            self._finish(job, RuntimeError(msg.reason))

    def _on_transfer_done(self, msg: TransferDone) -> None:
        if msg.job.state is not JobState.DONE:
            self._finish(msg.job, msg.error)

    def _expire(self) -> None:
        now = time.time()
        for job in list(self.sched.by_id.values()):
            if job.deadline is not None and now > job.deadline:
                self._finish(job, TimeoutError("request deadline passed on the prefill worker"))

    def _finish(self, job: PrefillJob, error: Exception | None) -> None:
        self.sched.release(job)
        job.on_done(job, error)

    # ------------------------------------------------------------------ one forward
    def _step(self, chunks: list[Chunk]) -> None:
        runner = self.runner
        t0 = time.perf_counter()
        for c in chunks:
            if c.job.cached_len and c.job.next_seq == 0:  # just admitted with a cache hit
                self._send_cached(c.job)
        seqs = [SeqSpec(c.job.prompt_ids[c.start:c.end], range(c.start, c.end), seq_len=c.end,
                        pages=c.job.pages, logit_rows=[c.end - c.start - 1] if c.is_final else [])
                for c in chunks]
        batch = ForwardBatch.build(seqs, runner.page_size, runner.device)
        # the final group of a final chunk waits for the aux record when there is no draft
        hold_last = not self.spec.enabled
        sent_upto = [0] * len(chunks)

        def on_layer(i: int) -> None:
            if (i + 1) % self.group and i + 1 != self.num_layers:
                return
            for n, c in enumerate(chunks):
                if hold_last and c.is_final and i + 1 == self.num_layers:
                    continue
                self._send(c, range(sent_upto[n], i + 1))
                sent_upto[n] = i + 1

        logits, hidden = runner.forward(batch, layer_hook=on_layer)
        self.sched.key_pages()  # the earlier steps' pages, while this forward runs on the device
        finals = [c for c in chunks if c.is_final]
        if finals:
            rows = self.sampler.sample(logits, [RowContext(c.job.params, c.job.prompt_ids, [], grammar=c.job.grammar)
                                                for c in finals])
            for c, row in zip(finals, rows):
                c.job.first_token, c.job.first_logprob = row.token, (row.logprob or 0.0)
                c.job.grammar_applied = c.job.grammar is not None and c.job.grammar.active()
        states = self._draft(chunks, batch, hidden) if self.spec.enabled else {}
        for n, c in enumerate(chunks):
            c.job.compute_seconds += time.perf_counter() - t0
            if self.spec.enabled:
                aux = self._aux(c.job, states.get(id(c))) if c.is_final else None
                self._send(c, range(self.num_layers, self.num_layers + 1), aux)
            elif c.is_final:
                self._send(c, range(sent_upto[n], self.num_layers), self._aux(c.job, None))
        # the chunks' pages are keyed for the prefix cache during the next forward (scheduler.key_pages),
        # or before a release or a match that needs them
        for c in chunks:
            self.sched.advance(c)

    def _draft(self, chunks: list[Chunk], batch: ForwardBatch, hidden: torch.Tensor) -> dict[int, Any]:
        """MTP draft extend over every chunk: slot p takes (h_p, t_{p+1}); a final chunk's last
        next-token is the sampled first token."""
        seqs = []
        for c in chunks:
            nxt = c.job.prompt_ids[c.start + 1:c.end] + ([c.job.first_token] if c.is_final else
                                                          [c.job.prompt_ids[c.end]])
            seqs.append(SeqSpec(nxt, range(c.start, c.end), seq_len=c.end, pages=c.job.pages,
                                logit_rows=[c.end - c.start - 1] if c.is_final else []))
        dbatch = ForwardBatch.build(seqs, self.runner.page_size, self.runner.device)
        logits, h_out = self.runner.draft_forward(dbatch, hidden)
        finals = [c for c in chunks if c.is_final]
        if not finals:
            return {}
        last = torch.tensor([int(dbatch.query_start[i + 1]) - 1 for i, c in enumerate(chunks) if c.is_final],
                            device=h_out.device)
        states = draft_states(logits, h_out[last], self.spec.eagle_topk)
        return {id(c): s for c, s in zip(finals, states)}

    def _aux(self, job: PrefillJob, state: Any) -> AuxRecord:
        empty = torch.zeros(0)
        return AuxRecord(
            transfer_id=job.transfer_id, prompt_len=job.prompt_len, cached_tokens=job.cached_len,
            first_token=job.first_token, first_logprob=job.first_logprob,
            topk_p=state.topk_p.cpu() if state is not None else empty,
            topk_idx=state.topk_idx.cpu() if state is not None else empty.long(),
            hidden=state.hidden.cpu() if state is not None else empty,
        )

    def _send_cached(self, job: PrefillJob) -> None:
        """The cached prefix's KV of every layer, in the message sizes of computed chunks (a layer
        group of at most one chunk's tokens), so no gather is larger than a computed chunk's."""
        layers, step = self.runner.kv_pool.num_layers, self.sched.chunk_tokens
        for t0 in range(job.decode_cached, job.cached_len, step):
            for l0 in range(0, layers, self.group):
                self._send_range(job, range(l0, min(l0 + self.group, layers)), (t0, min(t0 + step, job.cached_len)))

    def _send(self, c: Chunk, layers: range, aux: AuxRecord | None = None) -> None:
        self._send_range(c.job, layers, (c.start, c.end), aux)

    def _send_range(self, job: PrefillJob, layers: range, tokens: tuple[int, int], aux: AuxRecord | None = None) -> None:
        if len(layers) == 0 and aux is None:
            return
        tokens = (max(tokens[0], job.decode_cached), tokens[1])  # never the KV the decode side holds
        if tokens[0] >= tokens[1]:  # never the final chunk: decode_cached < prompt_len
            return
        pool = self.runner.kv_pool
        data = pool.gather_tokens((layers.start, layers.stop), job.pages, tokens[1] - tokens[0], token_start=tokens[0])
        event = None
        if data.is_cuda:
            event = torch.cuda.Event()
            event.record()
        last = aux is not None
        seq = job.next_seq
        job.next_seq += 1
        job.kv_bytes += data.numel() * data.element_size()
        job.sender.submit(job.transfer_id, seq, (layers.start, layers.stop), tokens, data, last,
                          aux.pack() if aux is not None else None, event)
        if self.fanout is not None:
            self.fanout(job, seq, (layers.start, layers.stop), tokens, last)

    def _report(self) -> None:
        load = self.snapshot.load
        metrics.queue_depth().labels(queue="prefill_queued").set(load.queued)
        metrics.queue_depth().labels(queue="prefill_sending").set(load.waiting_for_kv)
        metrics.kv_pages().labels(state="free").set(load.free_pages)
        metrics.kv_pages().labels(state="used").set(load.used_pages)
        self._report_cache()

    def _report_cache(self) -> None:
        """Prefix-cache gauges, and the counters' growth since the last report."""
        sched, cache = self.sched, self.sched.cache
        for counter, total in ((metrics.prefix_cache_query_tokens_total, sched.query_tokens),
                               (metrics.prefix_cache_hit_tokens_total, sched.hit_tokens),
                               (metrics.prefix_cache_hit_requests_total, sched.hit_requests),
                               (metrics.prefix_cache_evictions_total, cache.evictions),
                               (metrics.prefix_cache_mtp_drops_total, cache.mtp_drops)):
            grown = total - self._reported.get(counter.__name__, 0)
            if grown:
                counter().inc(grown)
                self._reported[counter.__name__] = total
        pages = metrics.prefix_cache_pages()
        pages.labels(state="free").set(cache.allocator.num_free)
        pages.labels(state="cached").set(cache.num_cached)
        pages.labels(state="active").set(cache.num_active)
        metrics.prefix_cache_indexed_pages().set(cache.num_indexed)
