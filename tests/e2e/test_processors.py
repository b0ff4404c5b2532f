"""Logit processors through the disaggregated path, with and without speculation: the thinking
budget (docs/parsers.md rule 7), penalties and logit_bias, and the custom-processor gate."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import grpc
import pytest

from common.tools.tiny_model import make_tiny_model
from gateway.tokenizer import Tokenizer
from protos import gateway_pb2
from tests.e2e.conftest import gateway, generate
from tests.e2e.test_speculative import spec_args

# SGLang's Glm4MoeThinkingBudgetLogitProcessor().to_str() (docs/parsers.md §5)
SGLANG_BUDGET_PROCESSOR = json.dumps({"callable": (
    "80049556000000000000008c2a73676c616e672e7372742e73616d706c696e672e637573746f6d5f6c6f6769745f70726f636573"
    "736f72948c23476c6d344d6f655468696e6b696e674275646765744c6f67697450726f636573736f729493942e")})
MODES = {"plain": [], "eagle": spec_args(3, 1, 4)}


@pytest.fixture(scope="module")
def tiny47(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny47"), template="glm47")


def _chat(stub, text: str, budget: int, max_tokens: int = 24) -> tuple[str, str, gateway_pb2.Usage]:
    req = gateway_pb2.ChatRequest(messages=[gateway_pb2.ChatMessage(role="user", content=text)])
    req.sampling.max_tokens = max_tokens
    req.sampling.temperature = 0.0
    req.sampling.ignore_eos = True
    req.thinking.budget = budget
    reasoning = content = ""
    usage = None
    for r in stub.Chat(req, timeout=60):
        reasoning += r.delta.reasoning_content
        content += r.delta.content
        if r.HasField("usage"):
            usage = r.usage
    return reasoning, content, usage


def _assert_budget(tok: Tokenizer, out: list[int], budget: int) -> None:
    """Output after an open <think>: at most budget tokens, then newline, then </think>."""
    end, nl = tok.token_id("</think>"), tok.token_id("\n")
    assert end in out, f"</think> never came: {out}"
    i = out.index(end)
    assert i <= budget + 1, f"thinking ran {i} tokens past a budget of {budget}"
    assert out[i - 1] == nl, "the budget must force a newline before </think>"


@pytest.mark.parametrize("mode", ["plain", "eagle"])
def test_thinking_budget_glm47_prompt_opens_think(launch, tiny47, mode):
    cluster = launch(tiny47, extra_worker_args=MODES[mode],
                     extra_gateway_args=["--enable-custom-logit-processor", "--reasoning-parser", "glm45",
                                         "--tool-call-parser", "glm47"])
    stub = gateway(cluster)
    tok = Tokenizer.from_dir(tiny47)
    for budget in (0, 1, 5, 9):
        reasoning, _content, usage = _chat(stub, "Think briefly about the sky.", budget)
        # the template opened <think>; reasoning = budget free tokens + the forced newline
        assert usage.reasoning_tokens <= budget + 2, (budget, usage.reasoning_tokens)
        assert reasoning.endswith("\n"), repr(reasoning)
        if budget == 0:
            assert reasoning == "\n"
    # token level, via Generate on the same rendered prompt
    ids = tok.encode("[gMASK]<sop><|user|>Hi<|assistant|><think>")
    for budget in (0, 3, 7):
        out = _generate_with_processor(stub, ids, budget)
        _assert_budget(tok, out, budget)


def _generate_with_processor(stub, ids: list[int], budget: int) -> list[int]:
    req = gateway_pb2.GenerateRequest(tokens=gateway_pb2.TokenIds(ids=ids), skip_special_tokens=False,
                                      custom_logit_processor=SGLANG_BUDGET_PROCESSOR)
    req.custom_params.update({"thinking_budget": budget})
    req.sampling.max_tokens = budget + 12
    req.sampling.temperature = 0.0
    req.sampling.ignore_eos = True
    return [t for r in stub.Generate(req, timeout=60) for t in r.token_ids]


@pytest.mark.parametrize("mode", ["plain", "eagle"])
def test_thinking_budget_glm45_multi_turn_history(launch, tiny_model_dir, mode):
    cluster = launch(tiny_model_dir, extra_worker_args=MODES[mode],
                     extra_gateway_args=["--enable-custom-logit-processor"])
    stub = gateway(cluster)
    tok = Tokenizer.from_dir(tiny_model_dir)
    # GLM-4.5 history renders <think></think>; the model then opens its own <think> (here: given)
    prompt = ("[gMASK]<sop><|user|>\nHi<|assistant|>\n<think></think>\nHello!<|user|>\nBye<|assistant|>"
              "\n<think>")
    ids = tok.encode(prompt)
    assert tok.token_id("</think>") in ids  # the old SGLang bug ignored the budget here
    for budget in (0, 2, 6):
        _assert_budget(tok, _generate_with_processor(stub, ids, budget), budget)


def test_default_thinking_budget_applies_when_the_request_sets_none(launch, tiny_model_dir):
    """--default-thinking-budget is the gateway's: the budget of a request that sets none. A request's
    own budget wins even when larger, and the workers apply exactly what the gateway sent."""
    cluster = launch(tiny_model_dir, extra_gateway_args=["--enable-custom-logit-processor",
                                                         "--default-thinking-budget", "1"])
    stub = gateway(cluster)
    tok = Tokenizer.from_dir(tiny_model_dir)
    ids = tok.encode("[gMASK]<sop><|user|>\nHi<|assistant|>\n<think>")
    end = tok.token_id("</think>")
    req = gateway_pb2.GenerateRequest(tokens=gateway_pb2.TokenIds(ids=ids), skip_special_tokens=False)
    req.sampling.max_tokens, req.sampling.temperature, req.sampling.ignore_eos = 16, 0.0, True
    out = [t for r in stub.Generate(req, timeout=60) for t in r.token_ids]
    _assert_budget(tok, out, 1)  # no budget in the request: the server's
    assert out.index(end) == 2, out  # one free token, then the forced newline
    own = _generate_with_processor(stub, ids, 6)
    _assert_budget(tok, own, 6)
    assert own.index(end) == 7, own  # the request's 6 free tokens, then the forced newline: not capped at 1


@pytest.mark.parametrize("mode", ["plain", "eagle"])
def test_penalties_and_logit_bias_match_reference(launch, tiny_model_dir, reference, mode):
    cluster = launch(tiny_model_dir, extra_worker_args=MODES[mode])
    stub = gateway(cluster)
    ids = [30, 31, 32, 33, 34, 35]
    plain = reference.greedy(ids, 20)
    kw = {"frequency_penalty": 0.7, "presence_penalty": 0.4, "repetition_penalty": 1.3,
          "logit_bias": {plain[2]: -30.0, 123: 4.0}}
    want = reference.greedy(ids, 20, **kw)
    assert want != plain, "the processors must change this output for the test to mean anything"
    got = generate(stub, ids, max_tokens=20, temperature=0.0, ignore_eos=True, **kw)
    assert got.tokens == want


def test_custom_processor_gate_never_unpickles(launch, tiny_model_dir, tmp_path):
    cluster = launch(tiny_model_dir, extra_gateway_args=["--enable-custom-logit-processor"])
    stub = gateway(cluster)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    for payload in (pickle.dumps(Evil()), pickle.dumps(dict)):
        req = gateway_pb2.ChatRequest(messages=[gateway_pb2.ChatMessage(role="user", content="x")],
                                      custom_logit_processor=json.dumps({"callable": payload.hex()}))
        req.custom_params.update({"thinking_budget": 4})
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Chat(req, timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "custom_logit_processor" in err.value.details()
    assert not marker.exists(), "a client-supplied pickle was executed"
