"""The gateway and the workers agree on sampling: whatever the gateway accepts, the worker's check of
the wire message accepts too and rebuilds equal parameters; whatever the gateway refuses names a
field the client sent. Drawn over public requests (valid and not), model defaults and server limits."""

from __future__ import annotations

import re
from dataclasses import replace

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from common.serving.sampling_params import (
    INT32_MAX,
    SamplingError,
    SamplingParams,
    ServerSampling,
    given_fields,
)
from gateway import checks
from gateway.calls import Sampling
from gateway.errors import GatewayError
from protos import gateway_pb2, worker_pb2

SETTINGS = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INT32 = st.integers(-(2**31), INT32_MAX)
EDGES = [0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 100.0, -100.0, 0.5, 1e-45, 3.4e38, float("inf"), float("nan")]
# float32 values (what the public proto carries), with the bounds and their neighbours often
F32 = st.one_of(st.sampled_from(EDGES), st.floats(-3.0, 3.0, width=32), st.floats(width=32))
# generation_config.json numbers are JSON doubles: any size
F64 = st.one_of(st.sampled_from(EDGES), st.floats(-3.0, 3.0), st.floats(), st.integers(-3, 3))
SAMPLING_FIELDS = set(gateway_pb2.SamplingParams.DESCRIPTOR.fields_by_name)
FIELD = re.compile(r"^(sampling\.(\w+)(\[-?\d+\])?|top_logprobs|thinking\.budget) ")


def _pick(draw: st.DrawFn, wild: bool, valid: st.SearchStrategy, anything: st.SearchStrategy) -> object:
    """A value within bounds; in a wild example, sometimes anything the type can carry."""
    return draw(st.one_of(valid, anything) if wild else valid)


@st.composite
def servers(draw: st.DrawFn, wild: bool) -> ServerSampling:
    vocab = draw(st.integers(1, 2000))
    gen = {}
    for name, valid in (("temperature", st.floats(0.0, 2.0)), ("top_p", st.floats(1e-6, 1.0)),
                        ("min_p", st.floats(0.0, 1.0)), ("repetition_penalty", st.floats(0.01, 2.0))):
        if draw(st.booleans()):
            gen[name] = _pick(draw, wild, valid, F64)
    if draw(st.booleans()):
        gen["top_k"] = _pick(draw, wild, st.integers(-1, 50), st.integers(-(2**40), 2**40))
    thinking = draw(st.none() | st.integers(0, INT32_MAX))  # --default-thinking-budget (range-checked)
    return ServerSampling(
        defaults=replace(SamplingParams.from_generation_config(gen), thinking_budget=thinking),
        vocab_size=vocab, eos_token_ids=tuple(draw(st.lists(st.integers(0, vocab - 1), max_size=3))),
        context_length=draw(st.integers(2, 5000)),
        max_tokens_limit=draw(st.none() | st.integers(1, 5000)))


@st.composite
def requests(draw: st.DrawFn, vocab: int, wild: bool) -> gateway_pb2.SamplingParams:
    valid = {
        "temperature": st.floats(0.0, 2.0, width=32), "top_p": st.floats(0.0, 1.0, width=32, exclude_min=True),
        "min_p": st.floats(0.0, 1.0, width=32), "frequency_penalty": st.floats(-2.0, 2.0, width=32),
        "presence_penalty": st.floats(-2.0, 2.0, width=32),
        "repetition_penalty": st.floats(0.0, 2.0, width=32, exclude_min=True),
        "top_k": st.integers(-1, 50), "max_tokens": st.integers(1, 60), "min_tokens": st.integers(0, 8),
        "seed": st.integers(0, 2**64 - 1), "ignore_eos": st.booleans(),
        "stop_token_ids": st.lists(st.integers(0, vocab - 1), max_size=4),
        "logit_bias": st.dictionaries(st.integers(0, vocab - 1), st.floats(-100.0, 100.0, width=32), max_size=4),
    }
    anything = {
        "temperature": F32, "top_p": F32, "min_p": F32, "frequency_penalty": F32, "presence_penalty": F32,
        "repetition_penalty": F32, "top_k": INT32, "max_tokens": INT32, "min_tokens": INT32,
        "seed": st.integers(0, 2**64 - 1), "ignore_eos": st.booleans(),
        "stop_token_ids": st.lists(st.integers(0, 2**32 - 1), max_size=4),
        "logit_bias": st.dictionaries(INT32, F32, max_size=4),
    }
    fields = {name: _pick(draw, wild, strategy, anything[name]) for name, strategy in valid.items()
              if draw(st.booleans())}
    return gateway_pb2.SamplingParams(**fields)


@SETTINGS
@given(data=st.data())
def test_what_the_gateway_accepts_a_worker_accepts_as_is(data: st.DataObject) -> None:
    wild = data.draw(st.booleans())
    server = data.draw(servers(wild))
    msg = data.draw(requests(server.vocab_size, wild))
    prompt_len = data.draw(st.integers(1, server.context_length - 1))  # check_prompt_length passed
    top_logprobs = data.draw(st.integers(0, 20) | INT32 if wild else st.integers(0, 20))
    logprobs = data.draw(st.booleans()) or (top_logprobs > 0 and not wild)
    extra = {"logprobs": logprobs, "top_logprobs": top_logprobs,
             "thinking_budget": data.draw(st.none() | st.integers(0, 64) | (INT32 if wild else st.nothing()))}
    try:
        wire = checks.worker_sampling(Sampling(given=given_fields(msg), logprobs=logprobs, top_logprobs=top_logprobs),
                                      server, prompt_len=prompt_len, thinking_budget=extra["thinking_budget"])
    except GatewayError as e:  # refused: the message starts with a field the client sets
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT
        named = FIELD.match(e.message)
        assert named is not None, e.message
        assert named.group(2) is None or named.group(2) in SAMPLING_FIELDS, e.message
        event(f"refused: {named.group(2) or named.group(1)}")
        return
    event("accepted")
    gateway_params = SamplingParams.from_request(given_fields(msg), server, prompt_len=prompt_len, **extra)
    received = worker_pb2.WorkerSampling.FromString(wire.SerializeToString())  # over the network
    worker_params = SamplingParams.from_wire(received, vocab_size=server.vocab_size)
    assert worker_params == gateway_params
    assert worker_params.max_tokens is not None and prompt_len + worker_params.max_tokens <= server.context_length
    if extra["thinking_budget"] is None:
        assert worker_params.thinking_budget == server.defaults.thinking_budget
    else:
        assert worker_params.thinking_budget == extra["thinking_budget"]


@SETTINGS
@given(top_k=INT32, top_p=F32, repetition_penalty=F32, max_tokens=st.integers(0, 2**32 - 1),
       thinking_budget=st.none() | INT32, stop=st.lists(st.integers(0, 2**32 - 1), max_size=3))
def test_a_worker_refuses_a_bad_wire_message_by_field_and_takes_a_good_one_literally(
        top_k: int, top_p: float, repetition_penalty: float, max_tokens: int, thinking_budget: int | None,
        stop: list[int]) -> None:
    wire = worker_pb2.WorkerSampling(top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                                     max_tokens=max_tokens, stop_token_ids=stop)
    if thinking_budget is not None:
        wire.thinking_budget = thinking_budget
    try:
        params = SamplingParams.from_wire(wire, vocab_size=1000)
    except SamplingError as e:
        assert FIELD.match(str(e)) is not None and str(e).startswith(e.field), str(e)
        return
    if top_k == -1:
        wire.top_k = 0  # -1 and 0 both mean off; the wire writes 0
    assert params.to_wire() == wire
    assert params.thinking_budget == thinking_budget  # no worker default: absent stays absent


def test_wire_round_trip_and_no_worker_defaults() -> None:
    params = SamplingParams(temperature=0.5, top_p=0.75, top_k=40, min_p=0.125, seed=2**64 - 1,
                            frequency_penalty=-2.0, presence_penalty=1.5, repetition_penalty=2.0,
                            logit_bias={3: -100.0, 9: 0.25}, min_tokens=2, max_tokens=9, stop_token_ids=(5, 6),
                            ignore_eos=True, logprobs=True, top_logprobs=20, thinking_budget=0,
                            forced_prefix=(7, 8, 9), reasoning_first=True)
    assert SamplingParams.from_wire(params.to_wire(), vocab_size=10) == params
    off = SamplingParams(max_tokens=1)
    wire = off.to_wire()
    assert wire.top_k == 0 and not wire.HasField("seed") and not wire.HasField("thinking_budget")
    assert SamplingParams.from_wire(wire, vocab_size=10) == off
    with pytest.raises(SamplingError, match=r"^sampling\.max_tokens must be resolved"):
        SamplingParams().to_wire()
    with pytest.raises(SamplingError, match=r"^sampling\.top_p must be in \(0, 1\], got 0$"):
        SamplingParams.from_wire(worker_pb2.WorkerSampling(max_tokens=1), vocab_size=10)  # no 0 -> 1 fallback
    with pytest.raises(SamplingError, match=r"^sampling\.repetition_penalty must be in \(0, 2\] \(1 = off\), got 3$"):
        SamplingParams.from_wire(worker_pb2.WorkerSampling(top_p=1, repetition_penalty=3, max_tokens=1),
                                 vocab_size=10)


def test_generation_config_defaults() -> None:
    d = SamplingParams.from_generation_config({"temperature": 0.6, "top_p": 0.95, "top_k": 0, "other": 1})
    assert (d.temperature, d.top_p, d.top_k, d.min_p, d.repetition_penalty) == (0.6, 0.95, -1, 0.0, 1.0)
    assert SamplingParams.from_generation_config({"top_k": -1}).top_k == -1
    assert SamplingParams.from_generation_config({}) == SamplingParams()
