"""A PrefillEngine on the tiny model (CPU), driven turn by turn on the test thread, streaming its KV
through the loopback transport into a decode side that scatters every chunk into its own KV pool.

One event log records, in order, each target layer computed (`("layer", i)`), each MTP draft forward
(`("mtp",)`), each first-token sampling (`("sample", rows)`) and each chunk handed to the sender
(a `Sent`), so a test can assert the exact interleaving of compute and streaming.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.forward.batch import ForwardBatch, SeqSpec
from common.kvcache.allocator import PageAllocator
from common.kvcache.pool import KVPool
from common.model.config import SpecConfig
from common.runtime.runner import ModelRunner
from common.sampling.logit_processors import RowContext
from common.sampling.token_sampler import SampledRow, SpecialIds, TokenSampler
from common.serving.sampling_params import SamplingParams
from common.transport.aux import AuxRecord
from common.transport.base import TransferError
from common.transport.loopback import LoopbackSender
from common.transport.receiver import ReservationTable
from prefill_worker.scheduler import JobState, PrefillJob, PrefillScheduler
from prefill_worker.worker import PrefillEngine

PAGE = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=4)


@dataclass(frozen=True)
class Sent:
    """One chunk as the engine handed it to its sender."""

    transfer_id: int
    seq: int
    layers: tuple[int, int]
    tokens: tuple[int, int]
    is_last: bool
    aux: AuxRecord | None
    kv: torch.Tensor  # [l1 - l0, 2, t1 - t0, kv_heads, head_dim]

    @property
    def key(self) -> tuple:
        has_aux = self.aux is not None
        return ("send", self.transfer_id, self.seq, self.layers, self.tokens, self.is_last, has_aux)


class DecodeSide:
    """The decode worker's end of the loopback: a reservation per transfer, pages of its own pool,
    and a KVSink that scatters each received chunk there."""

    def __init__(self, like: KVPool, num_pages: int = 512) -> None:
        self.pool = KVPool(like.num_layers, num_pages, like.page_size, like.kv_heads, like.head_dim,
                           like.dtype, "cpu")
        self.allocator = PageAllocator(num_pages)
        self.table = ReservationTable(self, transfer_timeout_s=60)
        self.pages: dict[int, list[int]] = {}
        self.aux: dict[int, AuxRecord] = {}
        self.failed: dict[int, str] = {}

    def reserve(self, transfer_id: int, n_tokens: int) -> None:
        pages = self.allocator.alloc(-(-n_tokens // self.pool.page_size))
        assert pages is not None, "decode test pool too small"
        self.pages[transfer_id] = pages
        self.table.reserve(transfer_id)

    def kv(self, transfer_id: int, n_tokens: int) -> torch.Tensor:  # [layers, 2, n, Hk, D]
        return self.pool.gather_tokens((0, self.pool.num_layers), self.pages[transfer_id], n_tokens)

    def on_chunk(self, transfer_id: int, seq: int, layers: tuple[int, int], tokens: tuple[int, int],
                 heads: tuple[int, int], payload: torch.Tensor) -> None:
        self.pool.scatter_tokens(layers, self.pages[transfer_id], tokens[0], payload)

    def on_last(self, transfer_id: int, aux: bytes) -> None:
        self.aux[transfer_id] = AuxRecord.unpack(aux, transfer_id)

    def on_failed(self, transfer_id: int, reason: str) -> None:
        self.failed[transfer_id] = reason


class RecordingSender:
    """A LoopbackSender that logs every submit (a `Sent`) before delivering it."""

    def __init__(self, inner: LoopbackSender, events: list) -> None:
        self.inner = inner
        self.events = events

    def submit(self, transfer_id: int, seq: int, layers: tuple[int, int], tokens: tuple[int, int],
               kv_tensor: torch.Tensor | None, is_last: bool, aux: bytes | None = None,
               ready_event: object = None) -> None:
        rec = AuxRecord.unpack(aux, transfer_id) if aux is not None else None
        kv = kv_tensor.clone() if kv_tensor is not None else torch.empty(0)
        self.events.append(Sent(transfer_id, seq, tuple(layers), tuple(tokens), is_last, rec, kv))
        self.inner.submit(transfer_id, seq, layers, tokens, kv_tensor, is_last, aux, ready_event)

    def abort(self, transfer_id: int, reason: str = "aborted by prefill") -> bool:
        return self.inner.abort(transfer_id, reason)

    def poll(self, transfer_id: int) -> Any:
        return self.inner.poll(transfer_id)

    def close(self, timeout_s: float | None = None) -> None:
        self.inner.close(timeout_s)

    def break_pair(self, reason: str) -> list[int]:
        return self.inner.break_pair(reason)


class RecordingSampler(TokenSampler):
    def __init__(self, ids: SpecialIds, events: list) -> None:
        super().__init__(ids)
        self.events = events

    def sample(self, logits: torch.Tensor, rows: list[RowContext]) -> list[SampledRow]:
        self.events.append(("sample", len(rows)))
        return super().sample(logits, rows)


class Rig:
    """Engine + scheduler + loopback decode side. `held` transfers are never confirmed to the
    engine (their jobs stay SENDING) until the test confirms them itself."""

    def __init__(self, model_dir: Path, *, chunk_tokens: int = 64, group: int = 2, spec_topk: int = 0,
                 num_pages: int = 64, max_queued: int = 8) -> None:
        self.runner = ModelRunner(model_dir, "cpu", torch.float32, PAGE, num_pages, with_mtp=spec_topk > 0)
        self.num_layers = self.runner.config.num_hidden_layers
        self.events: list = []
        self.recording = True
        for i, layer in enumerate(self.runner.model.model.layers):
            layer.register_forward_hook(lambda *_, i=i: self._log(("layer", i)))
        if self.runner.model.mtp is not None:
            self.runner.model.mtp.register_forward_hook(lambda *_: self._log(("mtp",)))
        self.ids = SpecialIds.from_model_dir(str(model_dir))
        self.sched = PrefillScheduler(self.runner.allocator, PAGE, chunk_tokens, max_queued)
        spec = SpecConfig("EAGLE", 3, spec_topk, 4) if spec_topk else SpecConfig()
        sampler = RecordingSampler(self.ids, self.events)
        self.engine = PrefillEngine(self.runner, self.sched, sampler, spec, group)
        self.decode = DecodeSide(self.runner.kv_pool)
        self.sender = RecordingSender(LoopbackSender(self.decode.table, self._transfer_done), self.events)
        self.jobs: dict[int, PrefillJob] = {}
        self.done: dict[int, Exception | None] = {}  # on_done's error by transfer id
        self.computed: dict[int, torch.Tensor] = {}  # transfer id -> the prefill pool's KV of its prompt
        self.held: set[int] = set()
        self.free_at_start = self.runner.allocator.num_free

    # ------------------------------------------------------------------ requests
    def job(self, rid: str, prompt: list[int], params: SamplingParams = GREEDY, deadline: float | None = None,
            sender: Any = None) -> PrefillJob:
        tid = 100 + len(self.jobs)
        return PrefillJob(rid, tid, prompt, params, sender or self.sender, self._on_done, deadline=deadline)

    def submit(self, job: PrefillJob) -> PrefillJob:
        self.jobs[job.transfer_id] = job
        self.decode.reserve(job.transfer_id, job.prompt_len)
        self.engine.submit(job)
        return job

    def _on_done(self, job: PrefillJob, error: Exception | None) -> None:
        assert job.transfer_id not in self.done, f"on_done called twice for {job.request_id}"
        self.done[job.transfer_id] = error

    def _log(self, event: tuple) -> None:
        if self.recording:
            self.events.append(event)

    def _transfer_done(self, transfer_id: int, ok: bool, error: TransferError | None) -> None:
        if transfer_id not in self.held:
            self.confirm(transfer_id, None if ok else error)

    def confirm(self, transfer_id: int, error: Exception | None = None) -> None:
        """What the worker does when the sender reports a transfer confirmed (or failed)."""
        self.engine.transfer_done(self.jobs[transfer_id], error)

    # ------------------------------------------------------------------ driving
    def turn(self) -> None:
        with torch.inference_mode():
            self.engine.run_once()
        for job in self.jobs.values():
            if job.state is JobState.SENDING and job.transfer_id not in self.computed:
                n = job.prompt_len
                self.computed[job.transfer_id] = self.runner.kv_pool.gather_tokens(
                    (0, self.runner.kv_pool.num_layers), job.pages, n)

    def run(self, max_turns: int = 50) -> None:
        """Turn until every submitted job finished (held ones stay)."""
        for _ in range(max_turns):
            if all(t in self.done or t in self.held for t in self.jobs):
                return
            self.turn()
        left = [j.request_id for t, j in self.jobs.items() if t not in self.done]
        raise AssertionError(f"jobs did not finish: {left}")

    def trace(self) -> list[tuple]:
        return [e.key if isinstance(e, Sent) else e for e in self.events]

    def sent(self, transfer_id: int) -> list[Sent]:
        return [e for e in self.events if isinstance(e, Sent) and e.transfer_id == transfer_id]

    def close(self) -> None:
        self.decode.table.close()

    # ------------------------------------------------------------------ references
    def reference(self, prompt: list[int], topk: int = 0) -> tuple[int, torch.Tensor, tuple | None]:
        """One unchunked forward of the prompt on fresh pages: (greedy first token, KV of every pool
        layer [layers, 2, n, Hk, D], the draft state (topk_p, topk_idx, hidden) when topk > 0)."""
        runner, n = self.runner, len(prompt)
        self.recording = False
        pages = runner.allocator.alloc(-(-n // PAGE))
        assert pages is not None
        try:
            batch = ForwardBatch.build([SeqSpec(prompt, range(n), n, pages)], PAGE, "cpu")
            with torch.inference_mode():
                logits, hidden = runner.forward(batch)
                row = TokenSampler(self.ids).sample(logits.clone(), [RowContext(GREEDY, prompt, [])])[0]
                first = row.token
                draft = None
                if topk:
                    nxt = SeqSpec(prompt[1:] + [first], range(n), n, pages)
                    dbatch = ForwardBatch.build([nxt], PAGE, "cpu")
                    p, idx, h = runner.draft_topk_forward(dbatch, hidden, topk)
                    draft = (p[0], idx[0], h[0])
            kv = runner.kv_pool.gather_tokens((0, runner.kv_pool.num_layers), pages, n)
        finally:
            runner.allocator.free(pages)
            self.recording = True
        return first, kv, draft


def prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, 700, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def past() -> float:
    return time.time() - 1.0
