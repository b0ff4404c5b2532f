"""Structured output on the prefill worker (real PrefillWorkerApp, tiny model, CPU, loopback decode):
the first token is sampled under the grammar (grammar_applied), unless the output starts inside
reasoning (the grammar waits for "</think>"); a grammar that does not compile, or any grammar under
--grammar-backend none, is INVALID_ARGUMENT naming the field, before any compute."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
from tokenizers import Tokenizer

from prefill_worker.server import PrefillWorkerApp
from protos import worker_pb2
from tests.prefill_worker.rig import prompt
from tests.prefill_worker.test_servicer import app, call, refused, request  # noqa: F401 - app is a fixture


def constrained(grammar: worker_pb2.GrammarSpec, **fields) -> worker_pb2.PrefillRequest:  # type: ignore[no-untyped-def]
    """test_servicer's request with a grammar (one prompt for all)."""
    req = request(ids=prompt(1, 11), **fields)
    req.sampling.grammar.CopyFrom(grammar)
    return req


def _grammar(**kind) -> worker_pb2.GrammarSpec:  # type: ignore[no-untyped-def]
    return worker_pb2.GrammarSpec(**kind)


def test_the_first_token_is_sampled_under_the_grammar(app: PrefillWorkerApp, tiny_model_dir: Path) -> None:  # noqa: F811
    tok = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    free = call(app, request(rid="free", tid=1, ids=prompt(1, 11)))
    assert not free.grammar_applied
    for tid, pattern in ((2, "[0-9]{3}-[a-z]{2}"), (3, "(yes|no)!")):
        res = call(app, constrained(_grammar(regex=pattern), rid=f"g{tid}", tid=tid))
        assert res.grammar_applied
        text = tok.decode([res.first_token])
        prefix = {2: r"[0-9]{1,3}", 3: r"y|ye|yes|n|no"}[tid]
        assert re.fullmatch(prefix, text), text
    res = call(app, constrained(_grammar(regex="[0-9]+"), rid="r", tid=4, reasoning_first=True))
    assert not res.grammar_applied and res.first_token == free.first_token  # reasoning stays free


def test_a_grammar_that_does_not_compile_is_invalid_argument(app: PrefillWorkerApp) -> None:  # noqa: F811
    err = refused(app, constrained(_grammar(json_schema='{"type": ')))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.details.startswith("grammar.json_schema: ")
    assert app.engine.sched.cache.num_active == 0


def test_without_a_backend_a_grammar_is_refused(app: PrefillWorkerApp) -> None:  # noqa: F811
    app.grammar = None  # as --grammar-backend none builds it
    err = refused(app, constrained(_grammar(ebnf='root ::= "a"')))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details.startswith("grammar.ebnf is not supported") and "--grammar-backend none" in err.details
