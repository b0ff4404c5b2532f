"""PrefillServicer on a real PrefillWorkerApp (tiny model, CPU, engine thread running), its decode
peers replaced by the loopback transport: the RPC is called in-process with a fake context whose
abort raises, as grpc.aio's does. Checks the happy path, the refusals (each message names the
field or the cause), the status of each failure, Abort / cancellation, and that no page leaks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client import REGISTRY

from common.runtime.runner import ModelRunner
from common.sampling.token_sampler import SpecialIds, TokenSampler
from common.serving.sampling_params import SamplingParams
from common.tools.generate import reference_generate
from common.transport.handshake import PairingError
from common.transport.loopback import LoopbackSender
from common.worker.args import build_worker_config
from prefill_worker.scheduler import PrefillJob
from prefill_worker.server import PrefillWorkerApp, build_arg_parser
from prefill_worker.servicer import PrefillServicer
from protos import worker_pb2
from tests.polling import until
from tests.prefill_worker.rig import PAGE, DecodeSide, prompt


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class FakeContext:
    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


class HoldingSender(LoopbackSender):
    """Keeps the last chunk of a `hold` transfer back (still in flight) until `release`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hold: set[int] = set()
        self.stash: dict[int, tuple] = {}

    def submit(self, transfer_id: int, seq: int, layers: tuple[int, int], tokens: tuple[int, int],
               kv_tensor: torch.Tensor | None, is_last: bool, aux: bytes | None = None,
               ready_event: object = None) -> None:
        args = (transfer_id, seq, layers, tokens, kv_tensor, is_last, aux, ready_event)
        if is_last and transfer_id in self.hold:
            self.stash[transfer_id] = args
        else:
            super().submit(*args)

    def release(self, transfer_id: int) -> None:
        self.hold.discard(transfer_id)
        super().submit(*self.stash.pop(transfer_id))


class BreakingSender(LoopbackSender):
    """Its pair breaks right after the first chunk of a transfer went out."""

    def submit(self, transfer_id: int, seq: int, *args, **kwargs) -> None:
        super().submit(transfer_id, seq, *args, **kwargs)
        if seq == 0:
            self.break_pair("link down")


class FakeDecodeStub:
    def __init__(self, senders: FakeSenders) -> None:
        self.senders = senders

    async def AwaitReserved(self, query: worker_pb2.ReserveQuery, timeout: float) -> worker_pb2.ReserveReply:
        if self.senders.unreserved:
            raise grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND,
                                       details=f"transfer {query.transfer_id} unknown")
        self.senders.decode.reserve(query.transfer_id, 64)
        return worker_pb2.ReserveReply(reserved=True, **self.senders.answer)


class FakeSenders:
    """Stands in for prefill_worker.kv_sender.SenderPool: loopback senders into one decode side,
    reported to the app as the real pool's senders are."""

    def __init__(self, app: PrefillWorkerApp, decode: DecodeSide) -> None:
        self.app, self.decode = app, decode
        self.unreserved = False
        self.answer: dict = {}  # the decode side's cache answer in ReserveReply
        self.get_error: Exception | None = None
        self.ok = HoldingSender(decode.table, app._transfer_done, on_stats=app._transfer_stats)
        self.senders = {"ok": self.ok, "breaks": BreakingSender(decode.table, app._transfer_done)}

    async def get(self, address: str) -> LoopbackSender:
        if self.get_error is not None:
            raise self.get_error
        return self.senders[address]

    def stub(self, address: str) -> FakeDecodeStub:
        return FakeDecodeStub(self)


@pytest.fixture
def app(tiny_model_dir: Path) -> Iterator[PrefillWorkerApp]:
    ns = build_arg_parser().parse_args([
        "--model-path", str(tiny_model_dir), "--device", "cpu", "--page-size", str(PAGE), "--num-pages", "64",
        "--chunked-prefill-size", "8", "--disagg-layer-group-size", "2", "--max-queued-requests", "4"])
    cfg, _ = build_worker_config("prefill", ns)
    app = PrefillWorkerApp(cfg, ns.chunked_prefill_size, ns.disagg_layer_group_size)
    decode = DecodeSide(app.runner.kv_pool)
    app.senders = FakeSenders(app, decode)  # type: ignore[assignment]
    app.engine.start()
    yield app
    app.engine.stop()
    decode.table.close()
    cache = app.engine.sched.cache
    cache.check()
    assert cache.num_active == 0 and cache.num_free == cache.num_total, "KV pages leaked"
    assert not app.jobs and not app.engine.sched.by_id


def request(rid: str = "r", tid: int = 1, ids: list[int] | None = None, address: str = "ok",
            **fields) -> worker_pb2.PrefillRequest:
    """A request whose sampling is what the gateway sends (defaults resolved), with `fields` over it."""
    sampling = SamplingParams(temperature=0.0, max_tokens=4).to_wire()  # greedy
    sampling.MergeFrom(worker_pb2.WorkerSampling(**fields))
    for name, value in fields.items():  # MergeFrom skips proto3 zeros: a field set to 0 must still be 0
        if not isinstance(value, (list, dict)):
            setattr(sampling, name, value)
    return worker_pb2.PrefillRequest(request_id=rid, transfer_id=tid, input_ids=ids or prompt(tid, 11),
                                     sampling=sampling, decode_address=address)


def call(app: PrefillWorkerApp, req: worker_pb2.PrefillRequest) -> worker_pb2.PrefillResult:
    return asyncio.run(PrefillServicer(app).Prefill(req, FakeContext()))


def refused(app: PrefillWorkerApp, req: worker_pb2.PrefillRequest) -> Aborted:
    with pytest.raises(Aborted) as info:
        call(app, req)
    return info.value


def test_prefill_returns_the_first_token_and_the_decode_side_gets_the_kv(app, tiny_model_dir: Path) -> None:
    ids = prompt(1, 11)
    result = call(app, request(ids=ids))
    ref_runner = ModelRunner(tiny_model_dir, "cpu", torch.float32, PAGE, 16)
    want = reference_generate(ref_runner, TokenSampler(SpecialIds.from_model_dir(str(tiny_model_dir))), ids,
                              SamplingParams(temperature=0.0, max_tokens=1))
    assert result.first_token == want[0]
    assert result.kv_bytes == len(ids) * app.runner.kv_pool.bytes_per_token
    assert result.compute_seconds > 0 and result.cached_tokens == 0
    decode = app.senders.decode
    assert decode.aux[1].first_token == want[0] and not decode.failed
    ref_kv = ref_runner.kv_pool.gather_tokens((0, 3), [1, 2, 3], len(ids))  # reference_generate's pages
    torch.testing.assert_close(decode.kv(1, len(ids)), ref_kv, atol=1e-5, rtol=1e-4)


def test_a_shared_prefix_is_served_from_the_cache_and_decode_gets_the_same_kv(app, tiny_model_dir: Path) -> None:
    """Later prompts reuse the whole pages of the first one (8 of its 11 tokens at page size 4),
    report them as cached, and the decode side still receives every token's KV, equal to an
    uncached run's: a prefix ending inside a page, one ending at a page edge, and a prompt that is
    all cached pages (its last page is recomputed for the logits)."""
    hits_before = REGISTRY.get_sample_value("glmserve_prefix_cache_hit_tokens_total") or 0.0
    first = prompt(1, 11)
    ref_runner = ModelRunner(tiny_model_dir, "cpu", torch.float32, PAGE, 16)
    sampler = TokenSampler(SpecialIds.from_model_dir(str(tiny_model_dir)))
    cases = [(first, 0), (first[:10] + prompt(2, 5), 8), (first[:8] + prompt(3, 6), 8), (first[:8], 4)]
    for tid, (ids, cached) in enumerate(cases, start=20):
        result = call(app, request(tid=tid, ids=ids))
        want = reference_generate(ref_runner, sampler, ids, SamplingParams(temperature=0.0, max_tokens=1))
        assert (result.first_token, result.cached_tokens) == (want[0], cached)
        assert app.senders.decode.aux[tid].cached_tokens == cached
        assert result.kv_bytes == len(ids) * app.runner.kv_pool.bytes_per_token  # cached pages are sent too
        ref_kv = ref_runner.kv_pool.gather_tokens((0, 3), list(range(1, 1 + -(-len(ids) // PAGE))), len(ids))
        torch.testing.assert_close(app.senders.decode.kv(tid, len(ids)), ref_kv, atol=1e-5, rtol=1e-4)
    sched = app.engine.sched
    assert (sched.hit_requests, sched.hit_tokens) == (3, 20)
    metric = "glmserve_prefix_cache_hit_tokens_total"  # the engine reports it after its step
    asyncio.run(until(lambda: REGISTRY.get_sample_value(metric) - hits_before == 20))


def test_decode_held_tokens_are_not_sent_and_a_decode_computed_request_is_not_prefilled(app,
                                                                                          tiny_model_dir: Path) -> None:
    ids = prompt(4, 11)
    app.senders.answer = {"cached_tokens": 8}  # the decode worker holds pages 0 and 1
    result = call(app, request(tid=40, ids=ids))
    assert result.cached_tokens == 8 and result.kv_bytes == 3 * app.runner.kv_pool.bytes_per_token
    ref_runner = ModelRunner(tiny_model_dir, "cpu", torch.float32, PAGE, 16)
    want = reference_generate(ref_runner, TokenSampler(SpecialIds.from_model_dir(str(tiny_model_dir))), ids,
                              SamplingParams(temperature=0.0, max_tokens=1))
    assert result.first_token == want[0] and app.senders.decode.aux[40].first_token == want[0]
    ref_kv = ref_runner.kv_pool.gather_tokens((0, 3), [1, 2, 3], len(ids))
    torch.testing.assert_close(app.senders.decode.kv(40, len(ids))[:, :, 8:], ref_kv[:, :, 8:], atol=1e-5, rtol=1e-4)
    queried = app.engine.sched.query_tokens
    app.senders.answer = {"cached_tokens": 8, "decode_computes": True}
    result = call(app, request(tid=41, ids=ids))
    assert (result.cached_tokens, result.kv_bytes, result.compute_seconds) == (8, 0, 0.0)
    assert 41 not in app.senders.decode.aux and app.engine.sched.query_tokens == queried  # never admitted
    app.senders.answer = {"cached_tokens": 6}  # not whole pages: ignored, everything is sent
    assert call(app, request(tid=42, ids=ids)).kv_bytes == len(ids) * app.runner.kv_pool.bytes_per_token


def test_flush_cache_forgets_the_cached_prefixes(app) -> None:
    ids = prompt(1, 11)  # two whole pages at page size 4
    call(app, request(tid=30, ids=ids))
    flushed = asyncio.run(PrefillServicer(app).FlushCache(worker_pb2.FlushCacheRequest(), FakeContext()))
    assert flushed.pages_freed == 2 and app.engine.sched.cache.num_indexed == 0
    assert call(app, request(tid=31, ids=ids)).cached_tokens == 0


@pytest.mark.parametrize(("change", "message"), [
    ({"rid": ""}, "request_id must be set"),
    ({"ids": [], "tid": 0}, "input_ids must not be empty"),
    ({"address": ""}, "decode_address must be set"),
    ({"ids": [5, 900]}, "input_ids contains 900, outside the vocabulary [0, 832)"),
    ({"ids": [5] * 1024}, "prompt of 1024 tokens does not fit the model context of 1024"),
    ({"temperature": -1.0}, "sampling.temperature must be >= 0"),
    ({"max_tokens": 0}, "sampling.max_tokens must be >= 1"),
    ({"top_logprobs": 3}, "top_logprobs needs logprobs: true"),
    ({"stop_token_ids": [5000]}, "sampling.stop_token_ids[0] must be < vocab size 832"),
], ids=["request_id", "input_ids", "decode_address", "vocab", "context", "temperature", "max_tokens",
        "top_logprobs", "stop_token_ids"])
def test_bad_fields_are_refused_naming_the_field(app, change: dict, message: str) -> None:
    assert app.config.vocab_size == 832 and app.config.max_position_embeddings == 1024
    if change.get("ids") == []:
        req = request()
        del req.input_ids[:]
    else:
        req = request(**change)
    err = refused(app, req)
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT and message in err.details
    assert not app.engine.sched.by_id and not app.senders.decode.pages  # nothing reserved or run


def test_a_draining_worker_refuses_new_prefills(app) -> None:
    app.draining = True
    err = refused(app, request())
    assert err.code is grpc.StatusCode.UNAVAILABLE and "draining" in err.details


def test_an_incompatible_decode_worker_is_refused_with_the_difference(app) -> None:
    diff = "page_size differs: prefill 4, decode 16"
    app.senders.get_error = PairingError(f"incompatible prefill/decode pair: {diff}")
    err = refused(app, request())
    assert err.code is grpc.StatusCode.FAILED_PRECONDITION and diff in err.details


def test_an_unreachable_decode_worker_is_unavailable(app) -> None:
    app.senders.get_error = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, details="connection refused")
    err = refused(app, request(address="ok"))
    assert err.code is grpc.StatusCode.UNAVAILABLE
    assert err.details == "decode worker ok unreachable: connection refused"


def test_no_reservation_on_the_decode_side_aborts_before_compute(app) -> None:
    app.senders.unreserved = True
    err = refused(app, request(tid=7))
    assert err.code is grpc.StatusCode.ABORTED
    assert err.details.startswith("decode worker did not reserve KV for transfer 7")
    assert not app.engine.sched.by_id


def test_a_passed_deadline_is_deadline_exceeded_and_the_next_request_is_served(app) -> None:
    req = request(tid=2)
    req.deadline_unix = 1.0  # long ago
    err = refused(app, req)
    assert err.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert err.details == "prefill of r failed: request deadline passed on the prefill worker"
    assert call(app, request(tid=3)).kv_bytes > 0


def test_a_broken_transfer_is_aborted_and_decode_is_told(app) -> None:
    err = refused(app, request(tid=4, address="breaks"))
    assert err.code is grpc.StatusCode.ABORTED
    assert err.details == "prefill of r failed: loopback pair broken: link down"
    assert "link down" in app.senders.decode.failed[4]
    assert call(app, request(tid=5)).kv_bytes > 0  # the engine goes on


def test_a_deadline_passing_during_the_transfer_aborts_it_on_the_decode_side(app) -> None:
    app.senders.ok.hold.add(9)
    req = request(tid=9)
    req.deadline_unix = time.time() + 600

    async def scenario() -> Aborted:
        task = asyncio.create_task(PrefillServicer(app).Prefill(req, FakeContext()))
        await until(lambda: app.engine.sched.load().waiting_for_kv == 1)
        app.jobs[9].deadline = time.time() - 1  # the deadline passes while the last chunk is in flight
        with pytest.raises(Aborted) as err:
            await asyncio.wait_for(task, 10)
        return err.value

    err = asyncio.run(scenario())
    assert err.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert app.senders.decode.failed[9] == "aborted by prefill"


def test_a_duplicate_request_id_is_refused_without_harming_the_first(app) -> None:
    """The scheduler refuses a second job with an active request id; the refusal must not abort the
    job that holds the id."""
    app.senders.ok.hold.add(1)

    async def scenario() -> tuple[worker_pb2.PrefillResult, Aborted]:
        servicer = PrefillServicer(app)
        first = asyncio.create_task(servicer.Prefill(request("dup", tid=1), FakeContext()))
        await until(lambda: app.engine.sched.load().waiting_for_kv == 1)
        with pytest.raises(Aborted) as dup:
            await servicer.Prefill(request("dup", tid=2), FakeContext())
        app.senders.ok.release(1)
        return await asyncio.wait_for(first, 10), dup.value

    result, dup = asyncio.run(scenario())
    assert dup.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id 'dup' is already active on this worker" in dup.details
    assert result.kv_bytes == 11 * app.runner.kv_pool.bytes_per_token



def test_a_duplicate_call_cancelled_before_its_refusal_leaves_the_first_alone(app) -> None:
    """The cancelled call's abort names its own job: the job that holds the request id goes on."""
    app.senders.ok.hold.add(1)

    async def scenario() -> worker_pb2.PrefillResult:
        servicer = PrefillServicer(app)
        first = asyncio.create_task(servicer.Prefill(request("dup", tid=1), FakeContext()))
        await until(lambda: app.engine.sched.load().waiting_for_kv == 1)
        submit = app.engine.submit

        def submit_then_cancel(job: PrefillJob) -> None:  # the call is cancelled right after its Submit
            submit(job)
            dup.cancel()

        app.engine.submit = submit_then_cancel
        dup = asyncio.create_task(servicer.Prefill(request("dup", tid=2), FakeContext()))
        with pytest.raises(asyncio.CancelledError):
            await dup
        await asyncio.sleep(0.2)  # the engine handles the Submit (refused) and the Abort
        app.senders.ok.release(1)
        return await asyncio.wait_for(first, 10)

    result = asyncio.run(scenario())
    assert result.kv_bytes == 11 * app.runner.kv_pool.bytes_per_token

def test_get_load_and_abort_of_a_request_waiting_for_its_transfer(app) -> None:
    app.senders.ok.hold.add(6)

    async def scenario() -> tuple[worker_pb2.WorkerLoad, worker_pb2.AbortResponse, worker_pb2.AbortResponse]:
        servicer = PrefillServicer(app)
        task = asyncio.create_task(servicer.Prefill(request(tid=6), FakeContext()))
        await until(lambda: app.engine.sched.load().waiting_for_kv == 1)
        load = await servicer.GetLoad(worker_pb2.LoadRequest(), None)
        found = await servicer.Abort(worker_pb2.AbortRequest(transfer_id=6), None)
        unknown = await servicer.Abort(worker_pb2.AbortRequest(transfer_id=99), None)
        with pytest.raises(Aborted, match="prefill of r failed: aborted by the gateway"):
            await asyncio.wait_for(task, 10)
        return load, found, unknown

    load, found, unknown = asyncio.run(scenario())
    total = app.runner.allocator.num_total
    assert (load.running, load.queued, load.waiting_for_kv, load.free_pages, load.total_pages) == (
        0, 0, 1, total - 3, total)
    assert found.found and not unknown.found
    assert app.senders.decode.failed[6] == "aborted by prefill"  # the sender told decode


def test_a_cancelled_call_aborts_the_job_and_its_transfer(app) -> None:
    app.senders.ok.hold.add(8)

    async def scenario() -> None:
        task = asyncio.create_task(PrefillServicer(app).Prefill(request(tid=8), FakeContext()))
        await until(lambda: app.engine.sched.load().waiting_for_kv == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: not app.engine.sched.by_id)

    asyncio.run(scenario())
    assert app.senders.decode.failed[8] == "aborted by prefill"
