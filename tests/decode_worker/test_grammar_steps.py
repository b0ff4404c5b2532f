"""Structured output on the decode worker's steps (fp32 tiny model, CPU): the plain step samples every
token under the request's grammar mask until a stop id the grammar allowed; EAGLE masks every verify
row through the draft path and rolls back, so greedy EAGLE == plain decode token for token under a
grammar; the mask wins over logit_bias; a grammar request without its state fails, never unmasked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from common.grammar.factory import make_backend
from common.grammar.state import GrammarState
from common.grammar.vocab import GrammarVocab
from common.model.config import SpecConfig
from common.runtime.runner import ModelRunner
from common.sampling.logit_processors import RowContext
from common.sampling.token_sampler import SpecialIds, TokenSampler
from common.serving.sampling_params import Grammar, SamplingParams
from common.tools.agreeing_draft import make_agreeing_draft_model
from decode_worker.commit import StopRules
from decode_worker.scheduler import DecodeReq, ReqState
from decode_worker.spec.eagle import EagleStepper
from decode_worker.steps import PlainStepper

PAGE = 4
CODE = r"[0-9]{3}-[a-z]{2}"
WORDS = r"[a-z]{2,6}( [a-z]{2,6}){2,4}\."
SCHEMA = json.dumps({"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                                      "big": {"type": "boolean"}},
                     "required": ["color", "big"], "additionalProperties": False})


@pytest.fixture(scope="module")
def agreeing_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_agreeing_draft_model(tiny_model_dir, tmp_path_factory.mktemp("agree") / "model")


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def backends(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    vocab = GrammarVocab.from_model_dir(tiny_model_dir, 832)
    made = {name: make_backend(name, vocab) for name in ("xgrammar", "llguidance")}
    yield made
    for b in made.values():
        b.close()


@pytest.fixture(params=["xgrammar", "llguidance"])
def backend(request: pytest.FixtureRequest, backends):  # type: ignore[no-untyped-def]
    return backends[request.param]


class Case:
    """One request: its params, first output token (the prefill's, valid under its grammar)."""

    def __init__(self, params: SamplingParams, first: int) -> None:
        self.params, self.first = params, first


def _requests(runner: ModelRunner, cases: list[Case], recompute, backend, ids: SpecialIds) -> list[DecodeReq]:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(len(cases))
    reqs = []
    for i, c in enumerate(cases):
        prompt = torch.randint(0, 300, (6 + 5 * i,), generator=gen).tolist()
        r = DecodeReq(f"r{i}", i, prompt, c.params, channel=None, state=ReqState.RUNNING)  # type: ignore[arg-type]
        r.pages = list(range(1 + 48 * i, 1 + 48 * (i + 1)))
        if c.params.grammar is not None:
            r.grammar = GrammarState.create(backend, backend.compile(c.params.grammar), c.params.stop_token_ids,
                                            c.params.reasoning_first, ids.think_end)
        r.output_ids = [c.first]
        if r.grammar is not None:
            r.grammar.advance(r.output_ids)
        recompute(r)
        reqs.append(r)
    return reqs


def _run(stepper, reqs: list[DecodeReq]) -> list[list[int]]:  # type: ignore[no-untyped-def]
    for _ in range(80):
        batch = [r for r in reqs if r.finish is None]
        if not batch:
            return [r.output_ids for r in reqs]
        stepper.step(batch)
    raise AssertionError("requests did not finish")


def _cases(tok: Tokenizer, ids: SpecialIds) -> list[Case]:
    eos = ids.eos
    first = lambda text: tok.encode(text, add_special_tokens=False).ids[0]
    code = SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=eos, grammar=Grammar("regex", CODE))
    words = SamplingParams(temperature=0.0, max_tokens=60, stop_token_ids=eos, grammar=Grammar("regex", WORDS))
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    # the output starts inside reasoning; the prefill's first token was "</think>", so the grammar is on
    schema = SamplingParams(temperature=0.0, max_tokens=60, stop_token_ids=eos, reasoning_first=True,
                            grammar=Grammar("json_schema", SCHEMA))
    return [Case(code, first("1")), Case(words, first("a")), Case(free, 5), Case(schema, ids.think_end)]


def _check(reqs: list[DecodeReq], tok: Tokenizer, ids: SpecialIds) -> None:
    code, words, free, schema = reqs
    for r in (code, words, schema):
        assert r.finish is not None and r.finish.reason == "stop" and r.output_ids[-1] in ids.eos, r.request_id
        assert r.grammar.tokens == len(r.output_ids) - (r is schema), "every answer token sampled under the mask"
        assert r.grammar.violation is None
    assert re.fullmatch(CODE, tok.decode(code.output_ids[:-1]))
    assert re.fullmatch(WORDS, tok.decode(words.output_ids[:-1]))
    obj = json.loads(tok.decode(schema.output_ids[1:-1]))
    assert obj["color"] in ("red", "green", "blue") and isinstance(obj["big"], bool)
    assert free.grammar is None and len(free.output_ids) == 12


@torch.inference_mode()
def test_plain_decode_samples_every_token_under_the_grammar(tiny_model_dir: Path, tok: Tokenizer, backend) -> None:  # type: ignore[no-untyped-def]
    runner = ModelRunner(tiny_model_dir, "cpu", torch.float32, PAGE, 256)
    ids = SpecialIds.from_model_dir(str(tiny_model_dir))
    plain = PlainStepper(runner, TokenSampler(ids), StopRules(ids.eos))
    reqs = _requests(runner, _cases(tok, ids), plain.recompute, backend, ids)
    assert not plain.can_launch(reqs[0], 1), "a grammar row takes the host (synchronous) path"
    _run(plain, reqs)
    _check(reqs, tok, ids)


@pytest.mark.parametrize("name,spec,model", [("xgrammar", (3, 1, 4), "agreeing"), ("xgrammar", (3, 2, 6), "tiny"),
                                             ("llguidance", (3, 2, 6), "agreeing")])
@torch.inference_mode()
def test_greedy_eagle_equals_plain_decode_under_grammars(tiny_model_dir: Path, agreeing_model_dir: Path,
                                                         tok: Tokenizer, backends, name: str, spec,
                                                         model: str) -> None:  # type: ignore[no-untyped-def]
    """Chains and trees, drafts the grammar refuses (random MTP) and drafts it mostly allows (agreeing)."""
    backend = backends[name]
    model_dir = tiny_model_dir if model == "tiny" else agreeing_model_dir
    runner = ModelRunner(model_dir, "cpu", torch.float32, PAGE, 256, with_mtp=True)
    ids = SpecialIds.from_model_dir(str(tiny_model_dir))
    plain = PlainStepper(runner, TokenSampler(ids), StopRules(ids.eos))
    want = _run(plain, _requests(runner, _cases(tok, ids), plain.recompute, backend, ids))
    eagle = EagleStepper(runner, TokenSampler(ids), StopRules(ids.eos), SpecConfig("EAGLE", *spec))
    reqs = _requests(runner, _cases(tok, ids), eagle.recompute, backend, ids)
    assert _run(eagle, reqs) == want
    _check(reqs, tok, ids)
    if model == "agreeing":  # drafts the grammar allows are accepted: the rollback kept the matcher right
        assert reqs[1].accepted_drafts > 0


@torch.inference_mode()
def test_the_mask_wins_over_logit_bias(tiny_model_dir: Path, tok: Tokenizer, backend) -> None:  # type: ignore[no-untyped-def]
    ids = SpecialIds.from_model_dir(str(tiny_model_dir))
    letter = tok.encode("x", add_special_tokens=False).ids[0]
    params = SamplingParams(temperature=0.0, max_tokens=5, stop_token_ids=ids.eos, logit_bias={letter: 100.0},
                            grammar=Grammar("regex", "[0-9]+"))
    state = GrammarState.create(backend, backend.compile(params.grammar), params.stop_token_ids, False, None)
    logits = torch.zeros(2, 832)
    rows = TokenSampler(ids).sample(logits, [RowContext(params, [1, 2], [], grammar=state),
                                             RowContext(params.__class__(temperature=0.0, logit_bias={letter: 100.0}),
                                                        [1, 2], [])])
    assert tok.decode([rows[0].token]).isdigit() and rows[1].token == letter


def test_a_grammar_row_without_its_state_fails_instead_of_running_free(tiny_model_dir: Path) -> None:
    ids = SpecialIds.from_model_dir(str(tiny_model_dir))
    params = SamplingParams(temperature=0.0, grammar=Grammar("regex", "[0-9]+"))
    with pytest.raises(RuntimeError, match="asks for a grammar"):
        TokenSampler(ids).sample(torch.zeros(1, 832), [RowContext(params, [1], [])])
