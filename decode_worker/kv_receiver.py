"""Where received KV lands: the decode side's sink for the transport's receiver threads.

The engine registers a reservation (transfer id -> pages) when it admits a request and withdraws
it before it frees those pages. Chunks are scattered under the same lock, so a chunk that arrives
after an abort is dropped instead of writing into pages that may already belong to someone else.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

import torch

from common.kvcache.pool import KVPool
from common.serving import metrics
from common.transport.aux import AuxRecord
from common.transport.base import TransferStats
from common.transport.receiver import ReservationTable

log = logging.getLogger(__name__)


class KvListener(Protocol):
    """Told when a transfer's KV has landed or failed (decode_worker.worker.DecodeEngine)."""

    def kv_ready(self, transfer_id: int, aux: AuxRecord) -> None: ...
    def kv_failed(self, transfer_id: int, reason: str) -> None: ...


class PageSink:
    def __init__(self, pool: KVPool, engine: KvListener, transfer_timeout_s: float) -> None:
        self.pool = pool
        self.engine = engine
        self._lock = threading.Lock()
        self._pages: dict[int, list[int]] = {}
        # the transport's view of reservations: fails a reserved transfer that sees no chunk in time
        self.table = ReservationTable(self, transfer_timeout_s, on_stats=_record_stats)

    # ------------------------------------------------------------------ engine side
    def expect(self, transfer_id: int, pages: list[int]) -> None:
        with self._lock:
            self._pages[transfer_id] = pages
        self.table.reserve(transfer_id)

    def withdraw(self, transfer_id: int) -> None:
        with self._lock:
            known = self._pages.pop(transfer_id, None) is not None
        if known:
            self.table.cancel(transfer_id, "request finished or aborted on the decode worker")

    # ------------------------------------------------------------------ receiver threads
    def on_chunk(self, transfer_id: int, seq: int, layers: tuple[int, int], tokens: tuple[int, int],
                 payload: torch.Tensor) -> None:
        with self._lock:
            pages = self._pages.get(transfer_id)
            if pages is None:
                log.info("chunk %d of withdrawn transfer %d dropped", seq, transfer_id)
                return
            self.pool.scatter_tokens(layers, pages, tokens[0], payload)

    def on_last(self, transfer_id: int, aux: bytes) -> None:
        with self._lock:
            known = self._pages.pop(transfer_id, None) is not None
        if not known:
            return
        try:
            record = AuxRecord.unpack(aux, expected_transfer_id=transfer_id)
        except ValueError as e:
            self.engine.kv_failed(transfer_id, f"bad aux record: {e}")
            return
        self.engine.kv_ready(transfer_id, record)

    def on_failed(self, transfer_id: int, reason: str) -> None:
        self.withdraw(transfer_id)
        self.engine.kv_failed(transfer_id, reason)


def _record_stats(stats: TransferStats) -> None:
    if stats.ok:
        metrics.kv_transfer_bytes_total().inc(stats.bytes)
        metrics.kv_transfer_seconds().observe(stats.seconds)
