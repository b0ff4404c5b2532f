"""The prefill engine's failure paths (worker.py), driven through its public methods: abort before,
during and after compute, a failed transfer, deadlines, refusals, a failed forward. Every failure
frees the job's pages, reports one error through on_done, stops the job's stream, and leaves the
engine serving the other requests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.transport.base import PairBroken, TransferError
from common.transport.loopback import LoopbackSender
from common.worker.load import WorkerLoadFigures
from prefill_worker.scheduler import JobState
from tests.prefill_worker.rig import RecordingSender, Rig, past, prompt


@pytest.fixture
def rig(tiny_model_dir: Path):
    r = Rig(tiny_model_dir, group=2, chunk_tokens=4, max_queued=3)
    yield r
    r.close()


def assert_served(rig: Rig, tid: int) -> None:
    """The job finished without error and decode holds exactly the KV the prefill computed."""
    job = rig.jobs[tid]
    assert rig.done[tid] is None and job.state is JobState.DONE
    assert torch.equal(rig.decode.kv(tid, job.prompt_len), rig.computed[tid])
    assert rig.decode.aux[tid].first_token == job.first_token


def test_abort_before_compute_sends_nothing(rig: Rig) -> None:
    a = rig.submit(rig.job("a", prompt(0, 10)))
    b = rig.submit(rig.job("b", prompt(1, 6)))
    rig.engine.abort("a", "client went away")
    rig.run()
    err = rig.done[a.transfer_id]
    assert isinstance(err, RuntimeError) and str(err) == "client went away"
    assert rig.sent(a.transfer_id) == [] and a.first_token is None
    assert_served(rig, b.transfer_id)
    assert rig.runner.allocator.num_free == rig.free_at_start


def test_abort_between_chunks_stops_the_stream_and_frees_the_pages(rig: Rig) -> None:
    a = rig.submit(rig.job("a", prompt(2, 14)))  # chunks of 4: 4 steps
    rig.turn()
    assert a.state is JobState.PREFILLING and a.done_tokens == 4 and a.pages
    assert rig.runner.allocator.num_free == rig.free_at_start - 4
    b = rig.submit(rig.job("b", prompt(3, 6)))
    rig.engine.abort("a", "aborted by the gateway")
    rig.run()
    assert str(rig.done[a.transfer_id]) == "aborted by the gateway" and a.state is JobState.DONE
    assert [s.tokens for s in rig.sent(a.transfer_id)] == [(0, 4), (0, 4)]  # the first chunk's two groups
    assert a.first_token is None and a.pages == []
    assert_served(rig, b.transfer_id)
    assert rig.runner.allocator.num_free == rig.free_at_start


def test_abort_while_waiting_for_the_transfer_frees_the_pages_and_ignores_a_late_reply(rig: Rig) -> None:
    a = rig.job("a", prompt(4, 6))
    rig.held.add(a.transfer_id)
    rig.submit(a)
    for _ in range(3):
        rig.turn()
    assert a.state is JobState.SENDING and a.first_token is not None
    assert rig.sched.load().waiting_for_kv == 1 and rig.runner.allocator.num_free == rig.free_at_start - 2
    rig.engine.abort("a", "aborted by the gateway")
    rig.turn()
    assert str(rig.done[a.transfer_id]) == "aborted by the gateway"
    assert rig.runner.allocator.num_free == rig.free_at_start and rig.sched.load().waiting_for_kv == 0
    rig.confirm(a.transfer_id)  # the sender's confirmation arrives after the abort
    rig.turn()  # a second on_done would fail the rig's once-only check
    assert str(rig.done[a.transfer_id]) == "aborted by the gateway"


def test_abort_of_an_unknown_request_changes_nothing(rig: Rig) -> None:
    a = rig.submit(rig.job("a", prompt(5, 6)))
    rig.engine.abort("nobody", "aborted")
    rig.run()
    assert_served(rig, a.transfer_id)


def test_a_transfer_that_breaks_mid_prefill_fails_the_job_with_the_senders_error(rig: Rig) -> None:
    a = rig.submit(rig.job("a", prompt(6, 14)))
    rig.turn()
    assert rig.sender.break_pair("link down") == [a.transfer_id]
    b = rig.submit(rig.job("b", prompt(7, 5)))
    rig.run()
    err = rig.done[a.transfer_id]
    assert isinstance(err, PairBroken) and "link down" in str(err)
    assert "link down" in rig.decode.failed[a.transfer_id]  # decode was told as well
    assert len(rig.sent(a.transfer_id)) == 2  # no chunk computed after the failure was reported
    assert a.pages == [] and a.state is JobState.DONE
    assert_served(rig, b.transfer_id)
    assert rig.runner.allocator.num_free == rig.free_at_start


def test_a_transfer_failing_after_compute_fails_the_job(rig: Rig) -> None:
    a = rig.job("a", prompt(8, 3))
    rig.held.add(a.transfer_id)
    rig.submit(a)
    rig.turn()
    assert a.state is JobState.SENDING
    rig.confirm(a.transfer_id, TransferError("decode worker did not confirm the KV within 60 s"))
    rig.turn()
    err = rig.done[a.transfer_id]
    assert isinstance(err, TransferError) and "did not confirm" in str(err)
    assert rig.runner.allocator.num_free == rig.free_at_start


def test_a_deadline_already_passed_fails_before_any_compute(rig: Rig) -> None:
    a = rig.submit(rig.job("a", prompt(9, 8), deadline=past()))
    b = rig.submit(rig.job("b", prompt(10, 5)))
    rig.run()
    err = rig.done[a.transfer_id]
    assert isinstance(err, TimeoutError) and str(err) == "request deadline passed on the prefill worker"
    assert rig.sent(a.transfer_id) == []
    assert_served(rig, b.transfer_id)
    assert rig.runner.allocator.num_free == rig.free_at_start


def test_a_deadline_passing_between_chunks_stops_the_job(rig: Rig) -> None:
    a = rig.submit(rig.job("a", prompt(11, 14)))
    rig.turn()
    rig.turn()
    assert a.done_tokens == 8
    a.deadline = past()
    rig.run()
    assert isinstance(rig.done[a.transfer_id], TimeoutError)
    assert len(rig.sent(a.transfer_id)) == 4 and a.pages == []
    assert rig.runner.allocator.num_free == rig.free_at_start


def test_refusals_reach_on_done_and_leave_the_first_request_alone(rig: Rig) -> None:
    first = rig.submit(rig.job("a", prompt(12, 6)))
    dup = rig.submit(rig.job("a", prompt(13, 6)))  # same request id
    big = rig.submit(rig.job("big", prompt(14, 64 * 4)))  # more than the pool's 63 pages
    rig.run()
    assert isinstance(rig.done[dup.transfer_id], ValueError)
    assert "request_id 'a' is already active" in str(rig.done[dup.transfer_id])
    assert isinstance(rig.done[big.transfer_id], ValueError)
    assert "needs more KV pages than this worker has" in str(rig.done[big.transfer_id])
    assert rig.sent(dup.transfer_id) == rig.sent(big.transfer_id) == []
    assert_served(rig, first.transfer_id)
    assert rig.runner.allocator.num_free == rig.free_at_start


def test_a_full_queue_refuses_with_resource_exhaustion(tiny_model_dir: Path) -> None:
    rig = Rig(tiny_model_dir, group=2, chunk_tokens=64, num_pages=5, max_queued=1)  # 4 pages
    try:
        hog = rig.job("hog", prompt(15, 16))  # all 4 pages, held while it waits for the transfer
        rig.held.add(hog.transfer_id)
        rig.submit(hog)
        rig.turn()
        waiting = rig.submit(rig.job("waiting", prompt(16, 4)))
        refused = rig.submit(rig.job("refused", prompt(17, 4)))
        rig.turn()
        err = rig.done[refused.transfer_id]
        assert isinstance(err, OverflowError) and str(err) == "prefill queue is full (1 requests waiting)"
        assert rig.sched.load() == WorkerLoadFigures(running=0, queued=1, waiting_for_kv=1, free_pages=0,
                                                     total_pages=4)
        rig.confirm(hog.transfer_id)
        rig.run()
        assert rig.done[hog.transfer_id] is None
        assert_served(rig, waiting.transfer_id)
        assert rig.runner.allocator.num_free == rig.free_at_start
    finally:
        rig.close()


def test_a_failed_forward_fails_its_batch_and_the_engine_keeps_serving(rig: Rig) -> None:
    vocab = rig.runner.config.vocab_size
    bad = rig.submit(rig.job("bad", [1, 2, vocab + 5]))  # the embedding lookup raises
    rig.run()
    err = rig.done[bad.transfer_id]
    assert isinstance(err, RuntimeError) and str(err).startswith("prefill forward failed:")
    assert rig.runner.allocator.num_free == rig.free_at_start
    ok = rig.submit(rig.job("ok", prompt(18, 7)))
    rig.run()
    assert_served(rig, ok.transfer_id)
    assert rig.runner.allocator.num_free == rig.free_at_start


def test_a_closed_sender_fails_its_request_and_the_engine_keeps_serving(rig: Rig) -> None:
    closed = LoopbackSender(rig.decode.table, lambda *a: None)
    closed.close()
    gone = rig.submit(rig.job("gone", prompt(19, 6), sender=RecordingSender(closed, [])))
    rig.run()
    err = rig.done[gone.transfer_id]
    assert isinstance(err, RuntimeError) and "LoopbackSender is closed" in str(err)
    ok = rig.submit(rig.job("ok", prompt(20, 6)))
    rig.run()
    assert_served(rig, ok.transfer_id)
    assert rig.runner.allocator.num_free == rig.free_at_start
