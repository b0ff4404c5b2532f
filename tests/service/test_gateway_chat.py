"""Chat through the real gateway against scripted fake workers: typed deltas, usage, sampling."""

from __future__ import annotations

import json

import pytest

from common.serving.sampling_params import SamplingParams
from protos import gateway_pb2
from tests.service.gateway_harness import (
    GEN_TEMPERATURE,
    WEATHER_TOOL,
    Script,
    chat_request,
    chunked,
    collect,
    gateway_with_fakes,
    run,
)

OUTPUT = ("<think>Need the weather tool.</think>\nLet me check.<tool_call>get_weather\n"
          "<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
          "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>")


@pytest.mark.parametrize("sizes", [[1], [3, 1, 7], [1000]])
def test_stream_assembles_reasoning_content_and_tool_call(model_dir, tok, sizes):
    out_ids = tok.encode(OUTPUT) + [tok.token_id("<|observation|>")]
    script = Script(chunks=chunked(out_ids, sizes), finish_token=out_ids[-1], cached_tokens=3,
                    spec_steps_per_chunk=1)

    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: script) as h:
            msgs, ans = await collect(h.stub.Chat(chat_request(tools=[WEATHER_TOOL])))
            return msgs, ans, h.cluster

    msgs, ans, cluster = run(scenario())
    assert ans["reasoning"] == "Need the weather tool."
    assert ans["content"].strip() == "Let me check."
    assert len(ans["calls"]) == 1
    call = ans["calls"][0]
    assert call["name"] == "get_weather" and call["id"].startswith("call_") and len(call["id"]) == 29
    assert json.loads(call["arguments"]) == {"city": "Paris", "days": 2}
    fin = ans["finish"]
    assert fin.finish_reason == "tool_calls" and fin.WhichOneof("matched_stop") is None
    u = ans["usage"]
    assert u.completion_tokens == len(out_ids)
    n_reason = out_ids.index(tok.token_id("</think>")) + 1  # <think> ... </think> inclusive
    assert u.reasoning_tokens == n_reason
    assert u.cached_tokens == 3
    assert u.prompt_tokens == len(cluster.decodes[0].requests[0].input_ids) > 0
    # spec accounting: one verify step per chunk, the first token came from prefill
    steps = len(script.chunks)
    assert u.spec_verify_steps == steps
    assert u.spec_accept_length == pytest.approx(1 + max(len(out_ids) - 1 - steps, 0) / steps)
    assert all(m.id == msgs[0].id and m.id.startswith("chatcmpl-") and m.model == "glm-test" for m in msgs)
    assert sum(m.HasField("finish") for m in msgs) == 1 and msgs[-1].HasField("usage")
    # both legs got the same gateway-owned transfer id and the same prompt
    p, d = cluster.prefills[0].requests[0], cluster.decodes[0].requests[0]
    assert p.transfer_id == d.transfer_id != 0 and list(p.input_ids) == list(d.input_ids)
    assert p.decode_address == cluster.decode_addrs[0]
    assert d.prefill_worker_id == "prefill-0" and p.decode_worker_id == "decode-0"
    assert not cluster.prefills[0].aborts and not cluster.decodes[0].aborts


def test_order_preserved_when_content_follows_a_tool_call(model_dir, tok):
    text = ("</think>A<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n"
            "</tool_call>B")
    ids = tok.encode(text)
    script = Script(chunks=[ids])  # everything in one chunk: order must still be kept

    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: script) as h:
            return await collect(h.stub.Chat(chat_request(tools=[WEATHER_TOOL])))

    msgs, ans = run(scenario())
    kinds = []
    for m in msgs:
        if m.delta.content:
            kinds.append("content:" + m.delta.content)
        if m.delta.tool_calls:
            kinds.append("call")
    assert kinds.index("content:A") < kinds.index("call") < kinds.index("content:B")
    assert ans["finish"].finish_reason == "tool_calls"


def test_non_streaming_returns_one_message_equal_to_the_stream(model_dir, tok):
    out_ids = tok.encode(OUTPUT) + [tok.token_id("<|observation|>")]
    script = Script(chunks=chunked(out_ids, [2]), finish_token=out_ids[-1], logprobs=True)

    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: script) as h:
            one = [m async for m in h.stub.Chat(chat_request(tools=[WEATHER_TOOL], stream=False, logprobs=True,
                                                             top_logprobs=2))]
            _, streamed = await collect(h.stub.Chat(chat_request(tools=[WEATHER_TOOL])))
            return one, streamed

    one, streamed = run(scenario())
    assert len(one) == 1
    m = one[0]
    assert m.delta.reasoning_content == streamed["reasoning"]
    assert m.delta.content.strip() == streamed["content"].strip()
    assert len(m.delta.tool_calls) == 1 and m.delta.tool_calls[0].name == "get_weather"
    assert json.loads(m.delta.tool_calls[0].arguments) == json.loads(streamed["calls"][0]["arguments"])
    assert m.finish.finish_reason == "tool_calls" and m.usage.completion_tokens == len(out_ids)
    # one logprob entry per consumed token, with the token's text and the top alternatives
    assert [lp.token_id for lp in m.logprobs] == out_ids
    assert m.logprobs[1].token == tok.decode([out_ids[1]]) and len(m.logprobs[1].top_logprobs) == 2


def test_plain_answer_with_thinking_disabled_is_all_content(model_dir, tok):
    ids = tok.encode("The answer is 42.") + [tok.token_id("<|endoftext|>")]
    script = Script(chunks=chunked(ids, [2]), finish_token=ids[-1])

    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: script) as h:
            req = chat_request(thinking=gateway_pb2.Thinking(enabled=False))
            _, ans = await collect(h.stub.Chat(req))
            return ans, h.cluster.decodes[0].requests[0]

    ans, dreq = run(scenario())
    assert ans["content"] == "The answer is 42." and ans["reasoning"] == ""
    assert ans["finish"].finish_reason == "stop" and ans["finish"].token_id == ids[-1]
    assert ans["usage"].reasoning_tokens == 0
    # enable_thinking=false reached the template: the GLM-4.5 prompt closes an empty think block
    prompt = tok.decode(list(dreq.input_ids))
    assert prompt.endswith("/nothink<|assistant|>\n<think></think>")


def test_temperature_unset_vs_zero_reaches_the_worker_differently(model_dir, tok):
    ids = tok.encode("ok") + [tok.token_id("<|endoftext|>")]
    script = Script(chunks=[ids], finish_token=ids[-1])

    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: script) as h:
            await collect(h.stub.Chat(chat_request()))
            await collect(h.stub.Chat(chat_request(sampling=gateway_pb2.SamplingParams(temperature=0.0))))
            await collect(h.stub.Chat(chat_request(sampling=gateway_pb2.SamplingParams(
                top_k=-1, max_tokens=7, seed=5, stop_token_ids=[3]))))
            return h.cluster.decodes[0].requests, h.cluster.prefills[0].requests

    dreqs, preqs = run(scenario())
    unset, zero, other = (r.sampling for r in dreqs)
    assert unset.temperature == pytest.approx(GEN_TEMPERATURE)  # generation_config.json default
    assert zero.temperature == 0.0                               # greedy, not "unset"
    assert unset.top_p == pytest.approx(0.95) and unset.top_k == 0
    assert not unset.HasField("seed") and other.HasField("seed") and other.seed == 5
    assert other.max_tokens == 7 and other.top_k == 0
    assert unset.max_tokens == 1024  # --max-tokens-limit caps the default
    eos = {tok.token_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")}
    assert set(other.stop_token_ids) == eos | {3}
    assert [p.sampling for p in preqs] == [d.sampling for d in dreqs]  # both legs see the same sampling


def test_thinking_budget_native_and_sglang_processor(model_dir, tok):
    ids = tok.encode("ok") + [tok.token_id("<|endoftext|>")]
    script = Script(chunks=[ids], finish_token=ids[-1])
    sglang = ('{"callable": "80049556000000000000008c2a73676c616e672e7372742e73616d706c696e672e637573746f6d5f'
              '6c6f6769745f70726f636573736f72948c23476c6d344d6f655468696e6b696e674275646765744c6f67697450726f'
              '636573736f729493942e"}')

    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: script, enable_custom_logit_processor=True,
                                      default_thinking_budget=500) as h:
            await collect(h.stub.Chat(chat_request(thinking=gateway_pb2.Thinking(budget=64))))
            req = chat_request(custom_logit_processor=sglang)
            req.custom_params.update({"thinking_budget": 128})
            await collect(h.stub.Chat(req))
            await collect(h.stub.Chat(chat_request(thinking=gateway_pb2.Thinking(budget=900))))
            await collect(h.stub.Chat(chat_request()))
            return h.cluster.decodes[0].requests, h.cluster.prefills[0].requests

    decodes, prefills = run(scenario())
    # the request's own budget wins, above or below --default-thinking-budget, which applies only
    # when the request sets none; both workers read exactly that budget off the wire
    for requests in (decodes, prefills):
        on_wire = [SamplingParams.from_wire(r.sampling, vocab_size=tok.vocab_size).thinking_budget
                   for r in requests]
        assert on_wire == [64, 128, 900, 500]


def test_model_info_and_list_models(model_dir, tok):
    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: Script()) as h:
            info = await h.stub.GetModelInfo(gateway_pb2.GetModelInfoRequest())
            models = await h.stub.ListModels(gateway_pb2.ListModelsRequest())
            return info, models

    info, models = run(scenario())
    assert info.served_model_name == "glm-test" and info.max_context_length == 4096
    assert info.tool_call_parser == "glm45" and info.reasoning_parser == "glm45"
    assert info.vocab_size == tok.vocab_size and tok.token_id("<|endoftext|>") in info.eos_token_ids
    assert info.speculative.algorithm == "EAGLE" and info.speculative.num_draft_tokens == 4
    assert models.object == "list" and [m.id for m in models.data] == ["glm-test"]
    assert models.data[0].object == "model" and models.data[0].max_model_len == 4096
