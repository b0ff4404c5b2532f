"""The gateway's limits through its public ports: one concurrency cap for gRPC and HTTP together
(RESOURCE_EXHAUSTED / 429, a slot back after a finish, an error, a cancel and a disconnect), and the
prompt-size cap refusing before tokenising on both APIs."""

from __future__ import annotations

import aiohttp
import grpc

from protos import gateway_pb2
from tests.polling import until
from tests.service.gateway_harness import Script, chat_request, chunked, gateway_with_fakes, run

Code = grpc.StatusCode
USER = [{"role": "user", "content": "hi"}]


def test_concurrency_cap_is_shared_and_every_exit_gives_the_slot_back(model_dir, tok):
    ids = tok.encode("word " * 10) + [tok.token_id("<|observation|>")]

    def script_for(r):
        return Script(chunks=chunked(ids, [1]), finish_token=ids[-1], chunk_delay=0.05)

    async def first_message(call) -> None:
        async for _ in call:
            return

    async def scenario():
        async with gateway_with_fakes(model_dir, script_for, max_concurrent_requests=2) as h, \
                aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{h.gateway.http_port}/v1/chat/completions"
            gate = h.gateway.pipeline.admission
            seen = {}
            held = h.stub.Chat(chat_request("one"))
            await first_message(held)
            http_held = await s.post(url, json={"messages": USER, "stream": True})
            await http_held.content.readline()
            seen["running"] = gate.running
            try:
                await first_message(h.stub.Chat(chat_request("three")))
            except grpc.aio.AioRpcError as e:
                seen["grpc"] = (e.code(), e.details())
            busy = await s.post(url, json={"messages": USER})
            seen["http"] = (busy.status, busy.headers.get("Retry-After"), (await busy.json())["error"])
            held.cancel()                                  # a gRPC client cancel
            http_held.close()                              # an HTTP client gone mid-stream
            await until(lambda: gate.running == 0, "both slots back after the cancel and the disconnect")
            seen["after_cancels"] = gate.running
            two = await s.post(url, json={"messages": USER, "n": 2})  # two choices take both slots
            seen["n2"] = (two.status, len((await two.json())["choices"]))
            bad = await s.post(url, json={"messages": USER, "top_p": 5})  # a refusal inside the gate
            seen["bad"] = bad.status
            try:
                await first_message(h.stub.Chat(gateway_pb2.ChatRequest()))  # refused after admission
            except grpc.aio.AioRpcError as e:
                seen["grpc_bad"] = e.code()
            seen["finished"] = [m async for m in h.stub.Chat(chat_request("four", stream=False))][-1].finish.finish_reason
            seen["end"] = gate.running
            return seen

    seen = run(scenario())
    assert seen["running"] == 2
    busy = "the gateway is running its maximum of 2 concurrent requests (--max-concurrent-requests); retry later"
    assert seen["grpc"] == (Code.RESOURCE_EXHAUSTED, busy)
    status, retry, error = seen["http"]
    assert (status, retry, error["type"], error["code"]) == (429, "1", "rate_limit_error", "server_overloaded")
    assert "--max-concurrent-requests" in error["message"]
    assert seen["after_cancels"] == 0 and seen["n2"] == (200, 2) and seen["bad"] == 400
    assert seen["grpc_bad"] == Code.INVALID_ARGUMENT and seen["finished"] == "stop" and seen["end"] == 0


def test_prompt_chars_are_checked_before_tokenising_on_both_apis(model_dir, tok):
    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: Script(), max_prompt_chars=200) as h, \
                aiohttp.ClientSession() as s:
            h.gateway.pipeline.tokenizer.encode = None  # any tokenising would fail loudly
            base = f"http://127.0.0.1:{h.gateway.http_port}/v1"
            out = {}
            for name, call in (("chat", h.stub.Chat(chat_request("x" * 300))),
                               ("generate", h.stub.Generate(gateway_pb2.GenerateRequest(text="x" * 201)))):
                try:
                    [m async for m in call]
                except grpc.aio.AioRpcError as e:
                    out[name] = (e.code(), e.details())
            r = await s.post(f"{base}/completions", json={"prompt": "x" * 201})
            out["http"] = (r.status, (await r.json())["error"])
            return out

    out = run(scenario())
    code, details = out["chat"]
    assert code == Code.INVALID_ARGUMENT and details.startswith("messages is ") and "at most 200" in details
    over = "is 201 characters; at most 200 are accepted before tokenising (--max-prompt-chars)"
    assert out["generate"] == (Code.INVALID_ARGUMENT, "text " + over)
    status, error = out["http"]
    assert status == 400 and error["param"] == "prompt"
    assert error["message"] == "prompt " + over
