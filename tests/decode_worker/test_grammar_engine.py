"""Structured output through the decode engine and servicer (CPU, scripted stepper, no model): the
first token from the prefill and every committed token advance the request's matcher, each chunk
reports the cumulative grammar_tokens, a committed token outside the grammar fails the request
(INTERNAL, never a silent drop), and the servicer refuses a grammar it cannot compile, or any grammar
under --grammar-backend none, with INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from tokenizers import Tokenizer

from common.grammar.factory import make_backend
from common.grammar.state import GrammarState
from common.grammar.vocab import GrammarVocab
from common.serving.sampling_params import Grammar, SamplingParams
from decode_worker.commit import StopRules, commit_tokens
from decode_worker.output import ErrorEvent, FinishEvent, TokenEvent
from decode_worker.scheduler import DecodeReq
from decode_worker.servicer import DecodeServicer
from protos import worker_pb2
from tests.decode_worker.test_engine import Channel, aux, make_engine, submit, turn

REGEX = r"[0-9]{3}-[a-z]{2}"


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    b = make_backend("xgrammar", GrammarVocab.from_model_dir(tiny_model_dir, 832))
    yield b
    b.close()


class ScriptedStepper:
    """Each step commits the request's next scripted token."""

    def __init__(self, rules: StopRules, scripts: dict[str, list[int]]) -> None:
        self.rules, self.scripts = rules, scripts

    def step(self, reqs: list[DecodeReq]) -> None:
        for r in reqs:
            r.kv_len += 1
            commit_tokens(r, [self.scripts[r.request_id].pop(0)], self.rules)

    def on_kv_arrival(self, req: DecodeReq, aux) -> None:  # type: ignore[no-untyped-def]
        pass

    def recompute(self, req: DecodeReq) -> None:
        pass


def _ids(tok: Tokenizer, chars: str) -> list[int]:
    return [tok.token_to_id(c) for c in chars]


def test_every_committed_token_advances_the_grammar_and_chunks_count_them(tok: Tokenizer, backend) -> None:  # type: ignore[no-untyped-def]
    engine, _, _ = make_engine()
    eos = tok.token_to_id("<|endoftext|>")
    engine.rules = StopRules([eos])
    engine.admission.rules = engine.rules
    good, bad = _ids(tok, "23-ab") + [eos], _ids(tok, "23x")
    engine.stepper = engine.admission.stepper = ScriptedStepper(engine.rules, {"good": good, "bad": bad})
    params = SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=(eos,), grammar=Grammar("regex", REGEX))

    def request(rid: str, tid: int) -> DecodeReq:
        r = DecodeReq(rid, tid, [10, 11, 12], params, Channel())  # type: ignore[arg-type]
        r.grammar = GrammarState.create(backend, backend.compile(params.grammar), params.stop_token_ids, False, None)
        return r

    async def main() -> tuple[DecodeReq, DecodeReq]:
        a, b = request("good", 1), request("bad", 2)
        for r in (a, b):
            await submit(engine, r)
            engine.kv_ready(r.transfer_id, aux(r.transfer_id, first=tok.token_to_id("1")))
        for _ in range(8):
            turn(engine)
        return a, b

    a, b = asyncio.run(main())
    tokens = [ev for ev in a.channel.events if isinstance(ev, TokenEvent)]
    assert [ev.grammar_tokens for ev in tokens] == [ev.completion_tokens for ev in tokens]  # all under the mask
    assert tokens[-1].grammar_tokens == 7 and tok.decode(a.output_ids[:-1]) == "123-ab"
    assert isinstance(a.channel.events[-1], FinishEvent) and a.channel.events[-1].reason == "stop"
    err = b.channel.events[-1]
    assert isinstance(err, ErrorEvent) and err.code == "INTERNAL" and "outside the grammar" in err.message


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class FakeContext:
    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


def _refusal(grammar_backend, spec: worker_pb2.GrammarSpec) -> Aborted:  # type: ignore[no-untyped-def]
    app = SimpleNamespace(draining=False, streams=set(), grammar=grammar_backend, think_end_id=None,
                          config=SimpleNamespace(vocab_size=832, max_position_embeddings=4096))
    sampling = SamplingParams(temperature=0.0, max_tokens=8).to_wire()
    sampling.grammar.CopyFrom(spec)
    request = worker_pb2.DecodeRequest(request_id="r", transfer_id=1, input_ids=[1, 2, 3], sampling=sampling)

    async def first() -> None:
        await anext(DecodeServicer(app).Generate(request, FakeContext()))  # type: ignore[arg-type]

    with pytest.raises(Aborted) as info:
        asyncio.run(first())
    assert not app.streams
    return info.value


def test_the_servicer_refuses_a_grammar_that_does_not_compile_naming_the_field(backend) -> None:  # type: ignore[no-untyped-def]
    err = _refusal(backend, worker_pb2.GrammarSpec(regex="[0-9"))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.details.startswith("grammar.regex: ")


def test_without_a_backend_a_grammar_is_refused_never_ignored() -> None:
    err = _refusal(None, worker_pb2.GrammarSpec(json_schema='{"type": "object"}'))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details.startswith("grammar.json_schema is not supported") and "--grammar-backend none" in err.details
