"""Stop strings, cancellation, deadlines, dying workers and retries through the real gateway."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from protos import gateway_pb2
from tests.polling import until
from tests.service.gateway_harness import (
    Script,
    chat_request,
    chunked,
    collect,
    gateway_with_fakes,
    run,
)

NO_THINK = gateway_pb2.Thinking(enabled=False)


@pytest.mark.parametrize("sizes", [[1], [2, 5], [100]])
def test_stop_string_is_never_emitted_and_frees_both_legs(model_dir, tok, sizes):
    ids = tok.encode("Hello there, STOP and more text that must not appear") + [tok.token_id("<|endoftext|>")]
    script = Script(chunks=chunked(ids, sizes) + [[7]] * 20, chunk_delay=0.01, finish_token=None)

    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: script) as h:
            req = chat_request(thinking=NO_THINK, sampling=gateway_pb2.SamplingParams(stop=["STOP", "zzz"]))
            msgs, ans = await collect(h.stub.Chat(req))
            await asyncio.wait_for(h.cluster.decodes[0].abort_event.wait(), 2)
            return msgs, ans, h.cluster

    msgs, ans, cluster = run(scenario())
    assert ans["content"] == "Hello there, "
    assert all("STOP" not in m.delta.content and "more" not in m.delta.content for m in msgs)
    assert ans["finish"].finish_reason == "stop" and ans["finish"].stop_str == "STOP"
    assert ans["usage"].completion_tokens < len(ids)  # counted up to the token completing "STOP"
    tid = cluster.decodes[0].requests[0].transfer_id
    assert [a.transfer_id for a in cluster.decodes[0].aborts] == [tid]  # decode was still generating


def test_generate_stop_string_and_stop_token(model_dir, tok):
    eos = tok.token_id("<|endoftext|>")
    ids = tok.encode("one two three") + [eos]

    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: Script(chunks=chunked(ids, [1]), finish_token=eos)) as h:
            a = [m async for m in h.stub.Generate(gateway_pb2.GenerateRequest(
                text="count:", sampling=gateway_pb2.SamplingParams(stop=["three"])))]
            b = [m async for m in h.stub.Generate(gateway_pb2.GenerateRequest(
                tokens=gateway_pb2.TokenIds(ids=[1, 2, 3]), stream=False))]
            return a, b

    a, b = run(scenario())
    assert "".join(m.text for m in a) == "one two "
    assert a[-1].finish.stop_str == "three" and a[-1].finish.finish_reason == "stop"
    assert len(b) == 1 and b[0].text == "one two three"  # the stop token is counted, never decoded
    assert list(b[0].token_ids) == ids and b[0].finish.token_id == eos
    assert b[0].usage.prompt_tokens == 3 and b[0].usage.completion_tokens == len(ids)


def test_client_cancel_reaches_both_workers_as_abort(model_dir, tok):
    ids = tok.encode("a b c d e f g h")
    slow = Script(chunks=[[i] for i in ids] * 20, chunk_delay=0.05)

    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: slow) as h:
            call = h.stub.Chat(chat_request(thinking=NO_THINK))
            first = await call.read()
            call.cancel()
            p, d = h.cluster.prefills[0], h.cluster.decodes[0]
            await asyncio.wait_for(asyncio.gather(p.abort_event.wait(), d.abort_event.wait()), 3)
            return first, p, d

    first, p, d = run(scenario())
    assert first.delta.content
    tid = d.requests[0].transfer_id
    assert [a.transfer_id for a in p.aborts] == [tid] and [a.transfer_id for a in d.aborts] == [tid]
    assert p.aborts[0].request_id == d.requests[0].request_id


def test_client_deadline_is_deadline_exceeded_and_aborts_both_legs(model_dir, tok):
    slow = Script(chunks=[[5]] * 100, chunk_delay=0.05)

    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: slow) as h:
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await collect(h.stub.Chat(chat_request(thinking=NO_THINK), timeout=0.5))
            elapsed = time.monotonic() - t0
            d = h.cluster.decodes[0]
            await asyncio.wait_for(d.abort_event.wait(), 3)
            return ei.value, elapsed, d

    err, elapsed, d = run(scenario())
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and elapsed < 2
    assert 0 < d.requests[0].deadline_unix <= time.time() + 1  # the deadline travelled to the worker
    assert d.aborts and d.aborts[0].transfer_id == d.requests[0].transfer_id


def test_request_timeout_of_the_gateway_is_deadline_exceeded(model_dir, tok):
    slow = Script(chunks=[[5]] * 100, chunk_delay=0.05)

    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: slow, request_timeout=0.4) as h:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await collect(h.stub.Chat(chat_request(thinking=NO_THINK)))
            return ei.value

    err = run(scenario())
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline" in err.details()


def _spawn_decode(script: Script) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fake_workers.py")), "decode",
                             script.to_json()], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("PORT "), line
    return proc, f"127.0.0.1:{int(line.split()[1])}"


def test_decode_worker_dying_mid_stream_is_unavailable_quickly(model_dir, tok):
    proc, addr = _spawn_decode(Script(chunks=[[5], [6], [7], [8]], chunk_delay=0.05, die_after=2))
    try:
        async def scenario():
            async with gateway_with_fakes(model_dir, lambda r: Script(chunks=[[5]]), n_decode=0,
                                          extra_decode=[addr]) as h:
                call = h.stub.Chat(chat_request(thinking=NO_THINK))
                got = []
                t0 = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    async for m in call:
                        got.append(m)
                return ei.value, time.monotonic() - t0, got, h.gateway.router.decode[0].healthy

        err, elapsed, got, healthy = run(scenario())
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 17  # it really died (os._exit in the fake)
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "decode worker" in err.details()
    assert elapsed < 3
    assert len(got) == 2      # the two chunks before the death reached the client
    assert healthy is False   # and the worker left the rotation


def test_unavailable_before_first_token_retries_on_another_pair(model_dir, tok):
    ids = tok.encode("retried fine") + [tok.token_id("<|endoftext|>")]
    good = Script(chunks=[ids], finish_token=ids[-1])

    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: good, n_decode=2) as h:
            h.cluster.decodes[0].script_for = lambda r: Script(chunks=[ids], decode_error="UNAVAILABLE")
            h.cluster.decodes[1].script_for = lambda r: good
            answers = [(await collect(h.stub.Chat(chat_request(thinking=NO_THINK))))[1] for _ in range(2)]
            return answers, h.cluster

    answers, cluster = run(scenario())
    assert [a["content"] for a in answers] == ["retried fine"] * 2
    d0, d1 = cluster.decodes
    assert len(d0.requests) == 1      # tried once, then out of rotation until the health loop sees it
    assert len(d1.requests) == 2
    assert d0.requests[0].transfer_id != d1.requests[0].transfer_id  # fresh transfer id per attempt
    assert d0.requests[0].request_id == d1.requests[0].request_id


def test_a_dead_decode_failing_the_prefill_leg_first_is_blamed_on_the_decode(model_dir, tok):
    """The prefill worker cannot reach a decode worker that died and fails its leg first: the decode
    worker, not the healthy prefill worker, leaves the rotation, and the retry on the other decode
    worker answers (with one prefill worker, benching it would fail every request for a while)."""
    ids = tok.encode("retried fine") + [tok.token_id("<|endoftext|>")]
    good = Script(chunks=[ids], finish_token=ids[-1])

    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: good, n_decode=2, health_check_interval=30) as h:
            dead = h.cluster.decode_addrs[0]
            h.cluster.decodes[0].script_for = lambda r: Script(decode_error="UNAVAILABLE", decode_error_delay=0.05)
            h.cluster.prefills[0].script_for = lambda r: Script(prefill_error="UNAVAILABLE") \
                if r.decode_address == dead else good
            answers = [(await collect(h.stub.Chat(chat_request(thinking=NO_THINK))))[1] for _ in range(3)]
            return answers, h.cluster, h.gateway.router

    answers, cluster, router = run(scenario())
    assert [a["content"] for a in answers] == ["retried fine"] * 3
    assert len(cluster.decodes[0].requests) == 1 and len(cluster.decodes[1].requests) == 3
    assert router.prefill[0].healthy and not router.decode[0].healthy and router.decode[1].healthy


def test_least_loaded_routing_and_round_robin_on_ties(model_dir, tok):
    ids = tok.encode("x") + [tok.token_id("<|endoftext|>")]
    script = Script(chunks=[ids], finish_token=ids[-1])

    async def scenario():
        # the same prompt each time: load routing only (cache-aware routing is tests/service/test_gateway_routing.py)
        async with gateway_with_fakes(model_dir, lambda r: script, n_prefill=2, n_decode=3,
                                      health_check_interval=0.05, disable_radix_cache=True) as h:
            for _ in range(6):
                await collect(h.stub.Chat(chat_request(thinking=NO_THINK)))
            tie = [len(d.requests) for d in h.cluster.decodes]
            h.cluster.decodes[0].load.running = 50  # busy: the router must avoid it
            h.cluster.decodes[1].load.queued = 50
            def seen_busy() -> bool:
                loads = [d.load for d in h.gateway.router.decode if d.load is not None]
                return any(x.running == 50 for x in loads) and any(x.queued == 50 for x in loads)
            await until(seen_busy, "a health round reads the new loads")
            for _ in range(4):
                await collect(h.stub.Chat(chat_request(thinking=NO_THINK)))
            after = [len(d.requests) for d in h.cluster.decodes]
            return tie, after, [len(p.requests) for p in h.cluster.prefills]

    tie, after, prefills = run(scenario())
    assert tie == [2, 2, 2] and prefills == [5, 5]
    assert after == [2, 2, 6]


def test_prefill_failure_fails_fast_and_aborts_the_waiting_decode(model_dir, tok):
    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: Script(chunks=[[5]], prefill_error="INVALID_ARGUMENT")
                                      ) as h:
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await collect(h.stub.Chat(chat_request(thinking=NO_THINK)))
            d = h.cluster.decodes[0]
            await asyncio.wait_for(d.abort_event.wait(), 2)
            return ei.value, time.monotonic() - t0, d

    err, elapsed, d = run(scenario())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "prefill worker" in err.details()
    assert elapsed < 2  # not the decode's 5 s KV wait
    assert d.aborts[0].transfer_id == d.requests[0].transfer_id


def test_chat_json_shape_is_stable(model_dir, tok):
    """The public message is OpenAI-like when rendered as JSON (what grpcurl / Node clients see)."""
    from google.protobuf import json_format

    ids = tok.encode("hi") + [tok.token_id("<|endoftext|>")]

    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: Script(chunks=[ids], finish_token=ids[-1])) as h:
            return [m async for m in h.stub.Chat(chat_request(thinking=NO_THINK, stream=False))]

    (m,) = run(scenario())
    d = json.loads(json_format.MessageToJson(m, preserving_proto_field_name=True))
    assert d["delta"] == {"content": "hi"}
    assert d["finish"] == {"finish_reason": "stop", "token_id": ids[-1]}
    assert d["usage"]["completion_tokens"] == len(ids) and d["model"] == "glm-test"
