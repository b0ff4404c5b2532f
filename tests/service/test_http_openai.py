"""The OpenAI HTTP surface with the real `openai` client: the real gateway in-process on port 0 and
scripted fake workers (tests/service/fake_workers.py), so what the workers receive is checked too."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import openai
import pytest

from common.serving.custom_processor import Glm4MoeThinkingBudgetLogitProcessor
from tests.polling import until
from tests.service.gateway_harness import Harness, Script, chunked, gateway_with_fakes, run

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
ANSWER = ("<think>The user wants the weather.</think>Let me check."
          "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
          "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>")


def client(h: Harness, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{h.gateway.http_port}/v1", api_key="EMPTY",
                              max_retries=0, **kw)


def answer_script(tok, text: str = ANSWER, sizes=(1, 3), **kw) -> Script:
    ids = tok.encode(text) + [tok.token_id("<|observation|>")]
    return Script(chunks=chunked(ids, list(sizes)), finish_token=ids[-1], **kw)


async def accumulate(stream) -> dict:
    """Read an openai chat stream into the answer it spells (attribute access only, as users write)."""
    out = {"reasoning": "", "content": "", "calls": {}, "finish": None, "usage": None, "chunks": 0, "roles": 0}
    async for chunk in stream:
        out["chunks"] += 1
        if chunk.usage is not None:
            assert chunk.choices == []
            out["usage"] = chunk.usage
            continue
        (choice,) = chunk.choices
        delta = choice.delta
        out["reasoning"] += delta.reasoning_content or ""  # present on every delta, never raises
        out["content"] += delta.content or ""
        out["roles"] += delta.role == "assistant"
        for tc in delta.tool_calls or []:
            call = out["calls"].setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id is not None:
                assert call["id"] is None, "a call's id comes once"
                call["id"] = tc.id
            call["name"] += tc.function.name or ""
            call["arguments"] += tc.function.arguments or ""
        if choice.finish_reason is not None:
            out["finish"] = choice.finish_reason
    return out


def test_seed_call_of_the_sglang_glm_guide_runs_unmodified(model_dir, tok):
    """The guide's call, with this project's Glm4MoeThinkingBudgetLogitProcessor in place of SGLang's."""
    async def scenario(enabled: bool):
        async with gateway_with_fakes(model_dir, lambda r: answer_script(tok),
                                      enable_custom_logit_processor=enabled) as h, client(h) as c:
            try:
                response = await c.chat.completions.create(
                    model="zai-org/GLM-4.6",
                    messages=[{"role": "user", "content": "Question: Is Paris the Capital of France?"}],
                    max_tokens=1024,
                    extra_body={"custom_logit_processor": Glm4MoeThinkingBudgetLogitProcessor().to_str(),
                                "custom_params": {"thinking_budget": 512}})
            except openai.BadRequestError as e:
                return e, None
            # clients without sglang: vLLM's field needs no server flag
            await c.chat.completions.create(model="m", messages=USER, max_tokens=8,
                                                extra_body={"thinking_token_budget": 64})
            return response, [r.sampling for r in h.cluster.decodes[0].requests]

    response, sent = run(scenario(True))
    assert response.model == "zai-org/GLM-4.6"  # echoed, as SGLang does
    assert response.choices[0].message.reasoning_content == "The user wants the weather."
    assert sent[0].thinking_budget == 512 and sent[0].max_tokens == 1024
    assert sent[1].thinking_budget == 64
    err, _ = run(scenario(False))
    assert err.status_code == 400 and "--enable-custom-logit-processor" in err.message
    assert err.body["param"] == "custom_logit_processor"


def test_stream_and_non_stream_spell_the_same_answer_with_tool_choice(model_dir, tok):
    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: answer_script(tok)) as h, client(h) as c:
            whole = await c.chat.completions.create(model="m", messages=USER, tools=[WEATHER, TIME], temperature=0)
            streamed = await accumulate(await c.chat.completions.create(
                model="m", messages=USER, tools=[WEATHER, TIME], temperature=0, stream=True,
                stream_options={"include_usage": True}))
            required = await c.chat.completions.create(model="m", messages=USER, tools=[WEATHER, TIME],
                                                       tool_choice="required")
            named = await c.chat.completions.create(
                model="m", messages=USER, tools=[WEATHER, TIME],
                tool_choice={"type": "function", "function": {"name": "get_weather"}})
            none = await c.chat.completions.create(model="m", messages=USER, tools=[WEATHER, TIME],
                                                   tool_choice="none")
            return whole, streamed, required, named, none, [tok.decode(list(r.input_ids))
                                                            for r in h.cluster.prefills[0].requests], \
                [r.sampling for r in h.cluster.decodes[0].requests]

    whole, streamed, required, named, none, prompts, sent = run(scenario())
    # required / named are enforced while decoding by a tool-call grammar applied after the reasoning
    assert [list(s.forced_prefix) for s in sent] == [[]] * 5
    kinds = [s.grammar.WhichOneof("kind") if s.HasField("grammar") else None for s in sent]
    assert kinds == [None, None, "ebnf", "ebnf", None]
    assert "<tool_call>get_time" in sent[2].grammar.ebnf and "<tool_call>get_weather" in sent[2].grammar.ebnf
    assert "<tool_call>get_weather" in sent[3].grammar.ebnf and "get_time" not in sent[3].grammar.ebnf
    assert all(s.reasoning_first for s in sent)
    msg = whole.choices[0].message
    assert msg.reasoning_content == "The user wants the weather." and msg.content == "Let me check."
    (call,) = msg.tool_calls
    assert call.id.startswith("call_") and len(call.id) == 29 and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris", "days": 2}
    assert whole.choices[0].finish_reason == "tool_calls"
    # stream == one-shot: reasoning, content, each call's name and parsed arguments, finish, usage
    assert (streamed["reasoning"], streamed["content"]) == (msg.reasoning_content, msg.content)
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed["calls"].values()] == \
        [("get_weather", {"city": "Paris", "days": 2})]
    assert streamed["calls"][0]["id"].startswith("call_") and streamed["roles"] == 1
    assert streamed["finish"] == "tool_calls"
    assert streamed["usage"].model_dump() == whole.usage.model_dump()
    assert whole.usage.completion_tokens_details.reasoning_tokens == whole.usage.reasoning_tokens > 0
    assert whole.usage.prompt_tokens_details.cached_tokens == 0
    assert required.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert named.choices[0].message.tool_calls[0].function.name == "get_weather"
    # what the model was shown: all tools (auto, required), the named one only, none at all
    assert all("get_time" in p and "get_weather" in p for p in prompts[:3])
    assert "get_weather" in prompts[3] and "get_time" not in prompts[3]
    assert "<tools>" not in prompts[4]
    assert none.choices[0].message.tool_calls is None and "<tool_call>" in none.choices[0].message.content


def test_reasoning_switches_logprobs_n_and_stop(model_dir, tok):
    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: answer_script(tok, logprobs=True)) as h, client(h) as c:
            kept = await c.chat.completions.create(model="m", messages=USER, extra_body={"separate_reasoning": False})
            off = await c.chat.completions.create(
                model="m", messages=USER, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
            buffered = await accumulate(await c.chat.completions.create(
                model="m", messages=USER, stream=True, extra_body={"stream_reasoning": False}))
            lp = await c.chat.completions.create(model="m", messages=USER, logprobs=True, top_logprobs=2, n=2,
                                                 seed=7, stop=["check"])
            return kept, off, buffered, lp, h.cluster.prefills[0].requests, h.cluster.decodes[0].requests

    kept, _off, buffered, lp, preqs, dreqs = run(scenario())
    assert kept.choices[0].message.reasoning_content is None
    assert kept.choices[0].message.content.startswith("<think>The user wants the weather.</think>Let me check.")
    assert tok.decode(list(preqs[1].input_ids)).endswith("/nothink<|assistant|>\n<think></think>")
    assert buffered["reasoning"] == "The user wants the weather."
    assert [c.index for c in lp.choices] == [0, 1] and [r.sampling.seed for r in dreqs[3:5]] == [7, 8]
    assert all(c.message.content == "Let me " and c.finish_reason == "stop" and c.matched_stop == "check"
               for c in lp.choices)
    first = lp.choices[0].logprobs.content[0]
    assert first.logprob == -0.25 and len(first.top_logprobs) == 2 and first.bytes == list(first.token.encode())
    assert lp.usage.prompt_tokens == dreqs[3].input_ids.__len__()  # one prompt, counted once


def test_completions_models_health_and_metrics(model_dir, tok):
    script = answer_script(tok, "one two three", sizes=(2,), logprobs=True)

    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: script) as h, client(h) as c:
            text = await c.completions.create(model="m", prompt="count:", max_tokens=20, echo=True)
            ids = await c.completions.create(model="m", prompt=[1, 2, 3], stop=["three"])
            many = await c.completions.create(model="m", prompt=["a", "b"], n=2, logprobs=1)
            streamed = [ch async for ch in await c.completions.create(
                model="m", prompt="x", stream=True, stream_options={"include_usage": True})]
            models = await c.models.list()
            card = await c.models.retrieve("glm-test")
            try:
                await c.models.retrieve("other")
            except openai.NotFoundError as e:
                missing = e
            async with aiohttp.ClientSession() as s:
                base = f"http://127.0.0.1:{h.gateway.http_port}"
                health = (await s.get(f"{base}/health")).status
                deep = (await s.get(f"{base}/health_generate")).status
                metrics = await (await s.get(f"{base}/metrics")).text()
                info = await (await s.get(f"{base}/get_model_info")).json()
            return text, ids, many, streamed, models, card, missing, health, deep, metrics, info, \
                    h.cluster.decodes[0].requests

    text, ids, many, streamed, models, card, missing, health, deep, metrics, info, dreqs = run(scenario())
    assert text.choices[0].text == "count:one two three" and text.choices[0].finish_reason == "stop"
    assert ids.choices[0].text == "one two " and ids.choices[0].matched_stop == "three"
    assert dreqs[1].input_ids == [1, 2, 3] and dreqs[1].sampling.max_tokens == 16  # OpenAI's default
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].logprobs.tokens and many.choices[0].logprobs.text_offset[0] == 0
    assert many.usage.prompt_tokens == len(tok.encode("a")) + len(tok.encode("b"))
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == "one two three"
    assert streamed[-1].choices == [] and streamed[-1].usage.completion_tokens == sum(map(len, script.chunks))
    assert [m.id for m in models.data] == ["glm-test"] and card.id == "glm-test"
    assert missing.status_code == 404 and missing.body["code"] == "model_not_found"
    assert (health, deep) == (200, 200)
    assert "glmserve_requests_total" in metrics and "glmserve_ttft_seconds" in metrics
    assert info["served_model_name"] == "glm-test" and info["speculative"]["algorithm"] == "EAGLE"


def test_errors_are_openai_envelopes_with_the_right_status(model_dir, tok):
    def script_for(r):
        text = tok.decode(list(r.input_ids))
        if "busy" in text:
            return Script(decode_error="RESOURCE_EXHAUSTED")
        if "dies" in text:
            return answer_script(tok, "one two three four", sizes=(1,), error_after=2, decode_error="INTERNAL")
        return answer_script(tok)

    async def scenario():
        async with gateway_with_fakes(model_dir, script_for) as h, client(h) as c:
            seen = {}
            for name, kw in {
                "top_p": {"top_p": 2},
                "schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
                "role": {"messages": [{"role": "robot", "content": "x"}]},
                "image": {"messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
                "too_long": {"messages": [{"role": "user", "content": "word " * 5000}]},
                "required_no_tools": {"tool_choice": "required"},
                "regex": {"extra_body": {"regex": "a("}},
                "busy": {"messages": [{"role": "user", "content": "busy"}]},
            }.items():
                kw.setdefault("messages", USER)
                try:
                    await c.chat.completions.create(model="m", **kw)
                except openai.APIStatusError as e:
                    seen[name] = (e.status_code, e.body, e.response.headers)
            dies = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "dies"}], stream=True,
                                             extra_body={"chat_template_kwargs": {"enable_thinking": False}})
            text = ""
            with pytest.raises(openai.APIError) as mid:
                async for chunk in await dies:
                    text += chunk.choices[0].delta.content or ""
            async with aiohttp.ClientSession() as s:
                base = f"http://127.0.0.1:{h.gateway.http_port}"
                bad_json = await s.post(f"{base}/v1/chat/completions", data=b"{nope")
                unknown = await s.post(f"{base}/v1/chat/completions",
                                       json={"messages": USER, "frobnicate": 1, "user": "u"})
                route = await s.get(f"{base}/v1/embeddings")
                seen["bad_json"] = (bad_json.status, (await bad_json.json())["error"], {})
                seen["route"] = (route.status, (await route.json())["error"], {})
                ignored = unknown.status, unknown.headers.get("X-Glmserve-Ignored-Fields")
            await h.cluster.stop()  # every worker gone: 503 once the router has noticed
            await until(lambda: not any(w.healthy for w in h.gateway.router.workers), "the router sees every worker gone")
            try:
                await c.chat.completions.create(model="m", messages=USER)
            except openai.APIStatusError as e:
                seen["down"] = (e.status_code, e.body, e.response.headers)
            return seen, mid.value, text, ignored

    seen, mid, text, ignored = run(scenario())
    assert seen["top_p"][:2] == (400, {"message": "top_p must be in (0, 1], got 2", "type": "invalid_request_error",
                                       "param": "top_p", "code": "invalid_value"})
    assert seen["schema"][0] == 400 and seen["schema"][1]["code"] == "invalid_value"
    assert seen["schema"][1]["param"] == "response_format.json_schema.schema.type"
    assert seen["role"][0] == 400 and seen["role"][1]["param"] == "messages[0].role"
    assert seen["image"][0] == 400 and seen["image"][1]["param"] == "messages[0].content[0]"
    assert seen["too_long"][0] == 400 and seen["too_long"][1]["code"] == "context_length_exceeded"
    assert seen["required_no_tools"][0] == 400 and seen["required_no_tools"][1]["param"] == "tool_choice"
    assert seen["regex"][0] == 400 and seen["regex"][1]["param"] == "regex"
    assert seen["busy"][0] == 429 and seen["busy"][2]["retry-after"] == "1"
    assert seen["bad_json"][0] == 400 and seen["bad_json"][1]["code"] == "invalid_json"
    assert seen["route"][0] == 404 and "/v1/chat/completions" in seen["route"][1]["message"]
    assert seen["down"][0] == 503 and seen["down"][1]["type"] == "server_error"
    assert isinstance(mid, openai.APIError) and text and "one two three four".startswith(text)  # partial, then the error event
    assert ignored == (200, "frobnicate, user")


def test_client_disconnect_aborts_both_legs(model_dir, tok):
    """Closing the stream after the first chunk, and leaving during a long prefill, both free the workers."""
    def script_for(r):
        slow_prefill = "slow" in tok.decode(list(r.input_ids))
        return answer_script(tok, "word " * 200, sizes=(1,), chunk_delay=0.02,
                             prefill_delay=5.0 if slow_prefill else 0.0)

    async def scenario():
        async with gateway_with_fakes(model_dir, script_for) as h, client(h) as c:
            stream = await c.chat.completions.create(model="m", messages=USER, stream=True)
            async for _ in stream:
                break
            t0 = time.monotonic()
            await stream.close()
            legs = (h.cluster.decodes[0].abort_event, h.cluster.prefills[0].abort_event)
            # the gateway aborts both legs at once; either may land first
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in legs)), 2)
            first = time.monotonic() - t0
            p_aborts = len(h.cluster.prefills[0].aborts)
            for e in legs:
                e.clear()
            task = asyncio.ensure_future(c.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "slow"}], stream=True))
            await asyncio.sleep(0.3)  # the request waits on its prefill
            task.cancel()
            t0 = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in legs)), 2)
            second = time.monotonic() - t0
            await until(lambda: not h.gateway.pipeline.inflight, "the aborted requests leave the in-flight set")
            return first, second, p_aborts, h.cluster

    first, second, p_aborts, cluster = run(scenario())
    assert first < 0.5 and second < 0.5
    assert len(cluster.decodes[0].aborts) == 2 and p_aborts >= 1 and len(cluster.prefills[0].aborts) == 2


def test_raw_sse_framing(model_dir, tok):
    """What curl sees: `data: {json}` events, the role chunk first, reasoning key on every delta, [DONE]."""
    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: answer_script(tok)) as h, aiohttp.ClientSession() as s:
            r = await s.post(f"http://127.0.0.1:{h.gateway.http_port}/v1/chat/completions",
                             json={"model": "m", "messages": USER, "stream": True, "tools": [WEATHER]})
            return r.status, r.headers["Content-Type"], (await r.read()).decode()

    status, ctype, body = run(scenario())
    assert status == 200 and ctype.startswith("text/event-stream")
    events = body.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-2])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "reasoning_content": None}
    assert all("reasoning_content" in c["choices"][0]["delta"] for c in chunks)
    starts = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", []) if "id" in tc]
    assert starts == [{"index": 0, "id": starts[0]["id"], "type": "function",
                       "function": {"name": "get_weather", "arguments": ""}}]
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {"reasoning_content": None}, "logprobs": None,
                                        "finish_reason": "tool_calls", "matched_stop": None}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["object"] == "chat.completion.chunk"


def test_api_key_body_limit_duplicate_rid_and_abort_request(model_dir, tok):
    def script_for(r):
        return answer_script(tok, "word " * 100, sizes=(1,), chunk_delay=0.02)

    async def scenario():
        async with gateway_with_fakes(model_dir, script_for, api_key="sk-test",
                                      max_message_bytes=64 * 1024) as h, aiohttp.ClientSession() as s:
            base = f"http://127.0.0.1:{h.gateway.http_port}"
            auth = {"Authorization": "Bearer sk-test"}
            seen = {"no_key": (await s.post(f"{base}/v1/chat/completions", json={"messages": USER})).status,
                    "models_open": (await s.get(f"{base}/v1/models")).status,
                    "health_open": (await s.get(f"{base}/health")).status}
            big = await s.post(f"{base}/v1/chat/completions", headers=auth,
                               json={"messages": [{"role": "user", "content": "x" * 100_000}]})
            seen["big"] = (big.status, (await big.json())["error"]["code"])
            long = await s.post(f"{base}/v1/chat/completions", headers=auth,
                                json={"messages": USER, "stream": True, "rid": "r1"})
            await long.content.readline()  # committed: the request runs
            dup = await s.post(f"{base}/v1/chat/completions", headers=auth, json={"messages": USER, "rid": "r1"})
            seen["dup"] = (dup.status, dup.headers.get("x-should-retry"))
            aborted = await (await s.post(f"{base}/abort_request", headers=auth, json={"rid": "r1"})).json()
            await asyncio.wait_for(h.cluster.decodes[0].abort_event.wait(), 2)
            seen["abort"] = aborted, len(h.cluster.prefills[0].aborts) + len(h.cluster.decodes[0].aborts)
            long.close()
            return seen

    seen = run(scenario())
    assert (seen["no_key"], seen["models_open"], seen["health_open"]) == (401, 200, 200)
    assert seen["big"] == (413, "request_too_large")
    assert seen["dup"] == (409, "false")
    assert seen["abort"][0] == {"found": True} and seen["abort"][1] >= 1


def test_a_slow_first_token_commits_the_stream_and_keeps_it_alive(model_dir, tok):
    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: answer_script(tok, prefill_delay=0.8),
                                      stream_commit_timeout=0.2, sse_keepalive=0.25) as h, \
                aiohttp.ClientSession() as s:
            t0 = time.monotonic()
            r = await s.post(f"http://127.0.0.1:{h.gateway.http_port}/v1/chat/completions",
                             json={"messages": USER, "stream": True})
            committed = time.monotonic() - t0
            return r.status, committed, (await r.read()).decode()

    status, committed, body = run(scenario())
    assert status == 200 and committed < 0.7  # 200 and the role chunk before the first token
    events = body.split("\n\n")
    assert events[0].startswith('data: {"id"') and '"role":"assistant"' in events[0]
    assert events[1] == ": keep-alive" and events[-2:] == ["data: [DONE]", ""]
