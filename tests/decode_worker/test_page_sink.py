"""The decode side's PageSink with a prefix-cache hit: the reservation's leading cached tokens live
in pages other requests may share, so no received chunk ever writes them."""

from __future__ import annotations

import torch

from common.kvcache.pool import KVPool
from decode_worker.kv_receiver import PageSink


class Listener:
    def kv_ready(self, transfer_id: int, aux) -> None: ...
    def kv_failed(self, transfer_id: int, reason: str) -> None: ...


def test_chunks_never_write_the_tokens_the_reservation_holds_from_the_cache() -> None:
    pool = KVPool(2, 8, 4, 1, 2, torch.float32, "cpu")
    sink = PageSink(pool, Listener(), transfer_timeout_s=30)
    try:
        pages = [3, 5, 6, 7]  # pages 3 and 5 are cached (tokens 0..7), 6 and 7 new
        sink.expect(11, pages, cached_tokens=8)
        payload = torch.arange(1.0, 1 + 2 * 2 * 12 * 2).reshape(2, 2, 12, 1, 2)
        sink.on_chunk(11, 0, (0, 2), (0, 12), (0, 1), payload)  # a sender that ignored the cached tokens
        sink.on_chunk(11, 1, (0, 2), (2, 6), (0, 1), payload[:, :, :4])  # wholly cached: dropped
        got = pool.gather_tokens((0, 2), pages, 12)
        assert torch.count_nonzero(got[:, :, :8]) == 0, "a cached page was written"
        assert torch.equal(got[:, :, 8:], payload[:, :, 8:])
        sink.withdraw(11)
        sink.expect(12, pages)  # no cache hit: everything lands
        sink.on_chunk(12, 0, (0, 2), (0, 12), (0, 1), payload)
        assert torch.equal(pool.gather_tokens((0, 2), pages, 12), payload)
    finally:
        sink.table.close()


def test_tp_followers_learn_the_cached_tokens_with_the_reservation() -> None:
    from common.worker.tp_kv import KvExpectPlan, skip_held

    plan = KvExpectPlan(7, (3, 5, 6), cached_tokens=8)
    assert KvExpectPlan.from_body(plan.kind, plan.body()) == plan
    payload = torch.zeros(1, 2, 6, 1, 2)
    assert skip_held(8, (4, 10), payload)[0] == (8, 10) and skip_held(8, (4, 10), payload)[1].shape[2] == 2
    assert skip_held(8, (2, 8), payload) is None and skip_held(0, (0, 6), payload)[1] is payload
