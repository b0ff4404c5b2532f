"""Where received KV lands: the decode side's sink for the transport's receiver threads.

The engine registers a reservation (transfer id -> pages) when it admits a request and withdraws
it before it frees those pages. Chunks are scattered under the same lock, so a chunk that arrives
after an abort is dropped instead of writing into pages that may already belong to someone else.
The leading pages a reservation took from the prefix cache may be shared with other requests: a
chunk's tokens before the reservation's `cached_tokens` are cut off, never written (a prefill
worker sends none; this guards against one that does). TP followers are told the same count.

Under tensor parallelism this is rank 0's sink: it holds rank 0's kv heads, tells the followers
each reservation and withdrawal (common/worker/tp_kv.py), and the request's KV is ready only when
every rank has reported its heads landed (the aux record arrives here, on rank 0's stream); one
rank's failure fails the transfer on all of them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Protocol

import torch

from common.kvcache.pool import KVPool
from common.serving import metrics
from common.transport.aux import AuxRecord
from common.transport.base import TransferStats
from common.transport.receiver import RankLayout, ReservationTable
from common.worker.ranks import Ranks
from common.worker.tp_kv import KV_FAILED, KV_LANDED, KvExpectPlan, KvWithdrawPlan, read_landed, skip_held

log = logging.getLogger(__name__)


class KvListener(Protocol):
    """Told when a transfer's KV has landed or failed (decode_worker.worker.DecodeEngine)."""

    def kv_ready(self, transfer_id: int, aux: AuxRecord) -> None: ...
    def kv_failed(self, transfer_id: int, reason: str) -> None: ...


@dataclass
class _Landing:
    """A TP transfer: the ranks whose heads have not landed yet, and the aux record once rank 0's came."""

    waiting: set[int]
    aux: bytes | None = None


class PageSink:
    def __init__(self, pool: KVPool, engine: KvListener, transfer_timeout_s: float, ranks: Ranks | None = None,
                 kv_heads: int = 0) -> None:
        """ranks: this worker's TP followers (None: one device holding every kv head); kv_heads: the
        model's (rank 0 holds the first block; 0: every transfer comes whole from one prefill rank)."""
        self.pool = pool
        self.engine = engine
        self.ranks = ranks
        self._lock = threading.Lock()
        self._pages: dict[int, list[int]] = {}
        self._floor: dict[int, int] = {}  # transfer -> its leading cached tokens (never written)
        self._landing: dict[int, _Landing] = {}
        layout = RankLayout(kv_heads, ranks.tp.size if ranks is not None else 1, 0) if kv_heads else None
        # the transport's view of reservations: fails a reserved transfer that sees no chunk in time
        self.table = ReservationTable(self, transfer_timeout_s, on_stats=_record_stats, layout=layout)
        if ranks is not None:
            ranks.on_report(KV_LANDED, self._follower_landed)
            ranks.on_report(KV_FAILED, self._follower_failed)

    # ------------------------------------------------------------------ engine side
    def expect(self, transfer_id: int, pages: list[int], cached_tokens: int = 0) -> None:
        with self._lock:
            self._pages[transfer_id] = pages
            self._floor[transfer_id] = cached_tokens
            if self.ranks is not None:
                self._landing[transfer_id] = _Landing(set(range(self.ranks.tp.size)))
        if self.ranks is not None:  # before the prefill side may send: the followers reserve too
            self.ranks.mirror.publish(KvExpectPlan(transfer_id, tuple(pages), cached_tokens))
        self.table.reserve(transfer_id)

    def withdraw(self, transfer_id: int) -> None:
        with self._lock:
            known = self._pages.pop(transfer_id, None) is not None
            self._floor.pop(transfer_id, None)
            landing = self._landing.pop(transfer_id, None)
        if self.ranks is not None and (known or landing is not None):
            self.ranks.mirror.publish(KvWithdrawPlan(transfer_id))
        if known:
            self.table.cancel(transfer_id, "request finished or aborted on the decode worker")

    # ------------------------------------------------------------------ receiver threads
    def on_chunk(self, transfer_id: int, seq: int, layers: tuple[int, int], tokens: tuple[int, int],
                 heads: tuple[int, int], payload: torch.Tensor) -> None:
        with self._lock:
            pages = self._pages.get(transfer_id)
            if pages is None:
                log.info("chunk %d of withdrawn transfer %d dropped", seq, transfer_id)
                return
            rest = skip_held(self._floor.get(transfer_id, 0), tokens, payload)
            if rest is not None:  # rank 0's heads start at 0
                self.pool.scatter_tokens(layers, pages, rest[0][0], rest[1], heads[0])  # rank 0's heads start at 0

    def on_last(self, transfer_id: int, aux: bytes) -> None:
        with self._lock:
            known = self._pages.pop(transfer_id, None) is not None
            self._floor.pop(transfer_id, None)
        if not known:
            return
        if self.ranks is None:
            self._ready(transfer_id, aux)
        else:
            self._landed(transfer_id, 0, aux)

    def on_failed(self, transfer_id: int, reason: str) -> None:
        self.withdraw(transfer_id)
        self.engine.kv_failed(transfer_id, reason)

    # ------------------------------------------------------------------ TP: the followers' reports
    def _follower_landed(self, rank: int, payload: bytes) -> None:
        self._landed(read_landed(payload)[0], rank, None)

    def _follower_failed(self, rank: int, payload: bytes) -> None:
        transfer_id, reason = read_landed(payload)
        with self._lock:
            live = transfer_id in self._landing
        if live:
            self.withdraw(transfer_id)
            self.engine.kv_failed(transfer_id, f"TP rank {rank}: {reason}")

    def _landed(self, transfer_id: int, rank: int, aux: bytes | None) -> None:
        with self._lock:
            landing = self._landing.get(transfer_id)
            if landing is None:
                return
            landing.waiting.discard(rank)
            if aux is not None:
                landing.aux = aux
            if landing.waiting:
                return
            del self._landing[transfer_id]
        self._ready(transfer_id, landing.aux or b"")

    def _ready(self, transfer_id: int, aux: bytes) -> None:
        try:
            record = AuxRecord.unpack(aux, expected_transfer_id=transfer_id)
        except ValueError as e:
            self.engine.kv_failed(transfer_id, f"bad aux record: {e}")
            return
        self.engine.kv_ready(transfer_id, record)


def _record_stats(stats: TransferStats) -> None:
    if stats.ok:
        metrics.kv_transfer_bytes_total().inc(stats.bytes)
        metrics.kv_transfer_seconds().observe(stats.seconds)
