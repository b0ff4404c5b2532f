"""Grammar backends (xgrammar, llguidance) on the tiny model's byte-level BPE vocabulary: each kind
(json_schema, json_object, regex, ebnf) drives a random "model" to text the constraint accepts;
compile errors name the field; the compile cache and its time bound; rollback; the reasoning gate
and stop ids of GrammarState; the token-bitmask op against a per-token loop."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from common import ops
from common.grammar.backend import GrammarBackend, GrammarCompileError, require_backend
from common.grammar.factory import make_backend
from common.grammar.state import GrammarState, fill_states
from common.grammar.vocab import GrammarVocab
from common.ops import reference
from common.serving.sampling_params import Grammar, SamplingError

VOCAB = 832  # the tiny model's lm_head rows (the tokenizer has 804 ids: the rest is padding)
SCHEMA = json.dumps({"type": "object", "properties": {"color": {"enum": ["red", "green"]},
                                                      "n": {"type": "integer"}},
                     "required": ["color", "n"], "additionalProperties": False})


@pytest.fixture(scope="module")
def vocab(tiny_model_dir: Path) -> GrammarVocab:
    return GrammarVocab.from_model_dir(tiny_model_dir, VOCAB)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))


@pytest.fixture(scope="module", params=["xgrammar", "llguidance"])
def backend(request: pytest.FixtureRequest, vocab: GrammarVocab) -> GrammarBackend:
    b = make_backend(request.param, vocab)
    assert b is not None
    yield b
    b.close()


def allowed(bitmask: torch.Tensor, row: int = 0) -> list[int]:
    bits = torch.arange(32, dtype=torch.int32)
    keep = ((bitmask[row, :, None] >> bits) & 1).reshape(-1)[:bitmask.shape[1] * 32]
    return keep.nonzero().reshape(-1).tolist()


def generate(backend: GrammarBackend, grammar: Grammar, seed: int, limit: int = 300,
             prefer: tuple[int, ...] = ()) -> tuple[list[int], GrammarState]:
    """Sample random allowed tokens until the request's stop id (the model's eos) is sampled; an
    allowed `prefer` token is taken half the time (closing brackets keep random JSON finite)."""
    state = GrammarState.create(backend, backend.compile(grammar), backend.vocab.end_ids, False, None)
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(limit):
        mask = torch.full((1, (VOCAB + 31) // 32), -1, dtype=torch.int32)
        assert state.fill(mask, 0, out)
        ids = allowed(mask)
        assert ids and max(ids) < 804, "padded ids and nothing else beyond the tokenizer are never allowed"
        ends = [t for t in ids if t in backend.vocab.end_ids]
        # prefer ending once possible half the time, so outputs stay short
        liked = [t for t in ids if t in prefer]
        if ends and torch.rand(1, generator=gen) < 0.5:
            tok = ends[0]
        elif liked and torch.rand(1, generator=gen) < 0.5:
            tok = liked[int(torch.randint(len(liked), (1,), generator=gen))]
        else:
            tok = ids[int(torch.randint(len(ids), (1,), generator=gen))]
        out.append(tok)
        state.advance(out)
        if tok in backend.vocab.end_ids:
            assert state.stopped and state.tokens == len(out)
            return out[:-1], state
    raise AssertionError("no stop within the limit")


@pytest.mark.parametrize("seed", range(3))
def test_each_kind_yields_text_the_constraint_accepts(backend: GrammarBackend, tokenizer: Tokenizer, seed: int) -> None:
    out, _ = generate(backend, Grammar("regex", r"[0-9]{3}-[a-z]{2}"), seed)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", tokenizer.decode(out))
    out, _ = generate(backend, Grammar("json_schema", SCHEMA), seed)
    obj = json.loads(tokenizer.decode(out))
    assert set(obj) == {"color", "n"} and obj["color"] in ("red", "green") and isinstance(obj["n"], int)
    closers = tuple(tokenizer.token_to_id(t) for t in ("}", "]", '"', "0") if tokenizer.token_to_id(t) is not None)
    out, _ = generate(backend, Grammar("json_object"), seed, prefer=closers)
    assert isinstance(json.loads(tokenizer.decode(out)), dict)
    out, _ = generate(backend, Grammar("ebnf", 'root ::= "yes" | "no" | "maybe " [0-9]'), seed)
    assert re.fullmatch(r"yes|no|maybe [0-9]", tokenizer.decode(out))


def test_json_strings_never_hold_a_control_character(backend: GrammarBackend, tokenizer: Tokenizer) -> None:
    """Inside a length-bounded JSON string xgrammar admits control characters other than CR / LF,
    which json.loads and JSON.parse refuse: no token holding one is allowed under a JSON kind, while a
    regex that asks for one still gets it."""
    from common.grammar.vocab import control_byte_ids

    nul = tokenizer.token_to_id("\u0100")  # the byte-level symbol of byte 0x00
    assert nul is not None and nul in control_byte_ids(backend.vocab)
    schema = json.dumps({"type": "object", "properties": {"b": {"type": "string", "maxLength": 3}}, "required": ["b"]})
    state = GrammarState.create(backend, backend.compile(Grammar("json_schema", schema)), backend.vocab.end_ids,
                                False, None)
    prefix = tokenizer.encode('{"b": "', add_special_tokens=False).ids
    mask = torch.full((1, (VOCAB + 31) // 32), -1, dtype=torch.int32)
    assert state.fill(mask, 0, prefix)
    inside = allowed(mask)
    assert tokenizer.token_to_id("a") in inside  # ordinary string text
    assert not set(inside) & set(control_byte_ids(backend.vocab))
    tab = Grammar("regex", "a\tb")
    state = GrammarState.create(backend, backend.compile(tab), backend.vocab.end_ids, False, None)
    mask = torch.full((1, (VOCAB + 31) // 32), -1, dtype=torch.int32)
    assert state.fill(mask, 0, tokenizer.encode("a", add_special_tokens=False).ids)
    assert set(allowed(mask)) & set(control_byte_ids(backend.vocab))


@pytest.mark.parametrize("grammar", [Grammar("regex", "[0-9"), Grammar("json_schema", '{"type": "objec'),
                                     Grammar("ebnf", 'root ::= "a" | b')])
def test_a_grammar_that_does_not_compile_names_its_field(backend: GrammarBackend, grammar: Grammar) -> None:
    with pytest.raises(GrammarCompileError) as info:
        backend.compile(grammar)
    msg = str(info.value)
    assert msg.startswith(f"grammar.{grammar.kind}: ") and len(msg) > len(f"grammar.{grammar.kind}: ") + 3
    assert isinstance(info.value, ValueError)  # the workers map ValueError to INVALID_ARGUMENT
    assert ".cc:" not in msg


def test_compiles_are_cached_by_kind_and_source(backend: GrammarBackend) -> None:
    a = backend.compile(Grammar("regex", "[ab]+"))
    assert backend.compile(Grammar("regex", "[ab]+")) is a
    assert backend.compile(Grammar("ebnf", 'root ::= "x"')) is not a
    fut = backend.submit(Grammar("regex", "[ab]+"))
    assert fut.done() and fut.result() is a
    assert asyncio.run(backend.compile_async(Grammar("regex", "c+d"))).grammar == Grammar("regex", "c+d")


def test_the_cache_evicts_the_least_recently_used(vocab: GrammarVocab) -> None:
    b = make_backend("xgrammar", vocab)
    b._cache_size = 2
    first = b.compile(Grammar("regex", "a"))
    b.compile(Grammar("regex", "b"))
    assert b.compile(Grammar("regex", "a")) is first  # refreshed: "b" is now the oldest
    b.compile(Grammar("regex", "c"))
    assert b.compile(Grammar("regex", "a")) is first
    assert set(b._cache) == {Grammar("regex", "a"), Grammar("regex", "c")}
    b.close()


class _Blocking(GrammarBackend):
    """A backend whose compile waits for a gate: a compile slower than the timeout."""

    name = "blocking"

    def __init__(self, vocab: GrammarVocab) -> None:
        super().__init__(vocab, compile_timeout=0.05)
        self.gate = threading.Event()

    def _compile(self, grammar: Grammar) -> str:
        self.gate.wait(10)
        return grammar.source

    def matcher(self, compiled):  # type: ignore[no-untyped-def]
        raise NotImplementedError


def test_a_slow_compile_fails_the_request_naming_the_field_and_is_cached_later(vocab: GrammarVocab) -> None:
    b = _Blocking(vocab)
    g = Grammar("json_schema", '{"type": "string"}')
    with pytest.raises(GrammarCompileError, match=r"^grammar\.json_schema: did not compile within 0\.05 s"):
        asyncio.run(b.compile_async(g))
    fut = b.submit(g)  # the same compile, still in flight: not started twice
    b.gate.set()
    assert fut.result(10).handle == g.source
    assert asyncio.run(b.compile_async(g)).handle == g.source
    b.close()


def test_no_backend_refuses_a_grammar_naming_the_field() -> None:
    with pytest.raises(SamplingError, match=r"^grammar\.regex is not supported: .*--grammar-backend none"):
        require_backend(None, Grammar("regex", "a+"))


def test_rollback_restores_the_mask(backend: GrammarBackend, tokenizer: Tokenizer) -> None:
    m = backend.matcher(backend.compile(Grammar("json_schema", SCHEMA)))
    before = torch.full((1, 26), -1, dtype=torch.int32)
    m.fill_bitmask(before, 0)
    toks = tokenizer.encode('{"color": "re', add_special_tokens=False).ids
    for t in toks:
        assert m.accept_token(t)
    assert not m.accept_token(tokenizer.encode("7", add_special_tokens=False).ids[0])  # refused, state kept
    mid = torch.full((1, 26), -1, dtype=torch.int32)
    m.fill_bitmask(mid, 0)
    assert allowed(mid) != allowed(before)
    m.rollback(len(toks))
    after = torch.full((1, 26), -1, dtype=torch.int32)
    m.fill_bitmask(after, 0)
    assert torch.equal(after, before)


def test_state_fill_over_a_path_equals_the_state_after_committing_it(backend: GrammarBackend,
                                                                     tokenizer: Tokenizer) -> None:
    g = Grammar("json_schema", SCHEMA)
    path = tokenizer.encode('{"color": "green", "n": 1', add_special_tokens=False).ids
    a = GrammarState.create(backend, backend.compile(g), (5,), False, None)
    b = GrammarState.create(backend, backend.compile(g), (5,), False, None)
    for cut in range(len(path) + 1):
        ma, mb = (torch.full((1, 26), -1, dtype=torch.int32) for _ in range(2))
        assert a.fill(ma, 0, path[:cut])  # a commits nothing: the path is fed and rolled back
        b.advance(path[:cut])
        assert b.fill(mb, 0, path[:cut])
        assert torch.equal(ma, mb), cut
    assert a.fed == 0 and b.fed == len(path) and b.tokens == len(path)


def test_batched_fill_of_many_requests_equals_one_row_at_a_time(backend: GrammarBackend,
                                                                  tokenizer: Tokenizer) -> None:
    """fill_states over several requests (plain rows, EAGLE-like chains with a path that leaves the
    grammar, a JSON and a regex grammar, one request past its stop id) writes exactly the masks that
    filling each row alone writes, constrains the same rows, and leaves every matcher committed."""
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
    g_json, g_re = Grammar("json_schema", SCHEMA), Grammar("regex", "[a-z]{1,6}[0-9]{2}")
    committed = [('{"color": "', g_json), ("", g_json), ('{"color": "red", "n": ', g_json), ("ab", g_re), ("", g_re)]
    states = []
    for text, g in committed:
        st = GrammarState.create(backend, backend.compile(g), (5,), False, None)
        st.advance(enc(text))
        states.append(st)
    stopped = GrammarState.create(backend, backend.compile(g_re), (5,), False, None)
    stopped.advance([5])  # its stop id: no row of it is constrained
    work, row = [], 0
    for st, (text, _), extra in zip(states, committed, ["gre", "", "12", "c7", "xyz!"]):  # "xyz!" leaves at '!'
        base, ext = enc(text), enc(extra)
        rows = [(row + k, base + ext[:k]) for k in range(len(ext) + 1)]  # an EAGLE chain's verify rows
        row += len(rows)
        work.append((st, rows))
    work.append((stopped, [(row, [5])]))
    row += 1
    together = torch.full((row, 26), -1, dtype=torch.int32)
    n_together = fill_states(together, work)
    alone = torch.full((row, 26), -1, dtype=torch.int32)
    n_alone = sum(st.fill(alone, r, h) for st, rows in work for r, h in rows)
    assert n_together == n_alone and 0 < n_alone < row
    assert torch.equal(together, alone)
    again = torch.full((row, 26), -1, dtype=torch.int32)
    assert fill_states(again, work) == n_together and torch.equal(again, together)  # matchers back where they were


def test_stop_ids_are_allowed_exactly_when_the_grammar_accepts(backend: GrammarBackend, tokenizer: Tokenizer) -> None:
    ends = backend.vocab.end_ids
    state = GrammarState.create(backend, backend.compile(Grammar("regex", "[0-9]{2}")), (7, 9), False, None)
    digits = tokenizer.encode("4", add_special_tokens=False).ids
    for n in range(3):
        mask = torch.full((1, 26), -1, dtype=torch.int32)
        history = [digits[0]] * n
        assert state.fill(mask, 0, history)
        ids = allowed(mask)
        assert not set(ends) & set(ids), "the model's own end ids give way to the request's stop ids"
        assert (7 in ids and 9 in ids) == (n == 2), n
        state.advance(history)
    state.advance([digits[0]] * 2 + [9])
    assert state.stopped and state.is_terminated() and state.tokens == 3
    assert not state.fill(torch.full((1, 26), -1, dtype=torch.int32), 0, [digits[0]] * 2 + [9])


def test_the_reasoning_gate_leaves_reasoning_free(backend: GrammarBackend, tokenizer: Tokenizer) -> None:
    think_end = tokenizer.token_to_id("</think>")
    state = GrammarState.create(backend, backend.compile(Grammar("regex", "[0-9]+")), (7,), True, think_end)
    words = tokenizer.encode("hello world", add_special_tokens=False).ids
    mask = torch.full((1, 26), -1, dtype=torch.int32)
    assert not state.fill(mask, 0, words) and not state.active()  # still reasoning: the row is left alone
    assert state.fill(mask, 0, words + [think_end])  # a draft path may cross the gate
    assert min(allowed(mask)) >= 0 and all(tokenizer.decode([t]).isdigit() for t in allowed(mask))
    state.advance(words + [think_end])
    assert state.active() and state.start == len(words) + 1 and state.tokens == 0
    digit = tokenizer.encode("3", add_special_tokens=False).ids[0]
    state.advance(words + [think_end, digit])
    assert state.tokens == 1 and state.violation is None
    state.advance(words + [think_end, digit] + words[:1])
    assert state.violation is not None and "outside the grammar" in state.violation


class _Allowing:
    """A matcher that allows exactly `ids`."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def accept_token(self, token: int) -> bool:
        return True

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = 0
        for t in self.ids:
            bitmask[row, t // 32] |= torch.tensor(1 << (t % 32), dtype=torch.int64).to(torch.int32)

    def rollback(self, n: int) -> None:
        pass

    def is_terminated(self) -> bool:
        return False


@pytest.mark.parametrize("accepting", [True, False])
def test_stop_bits_on_the_sign_bit(accepting: bool) -> None:
    """End id 31 (an int32 word's sign bit) gives way to stop ids 63 and 40 exactly when allowed."""
    mask = torch.full((1, 2), -1, dtype=torch.int32)
    state = GrammarState(_Allowing([5, 31] if accepting else [5]), (31,), (63, 40), None)
    assert state.fill(mask, 0, [])
    assert allowed(mask) == ([5, 40, 63] if accepting else [5])


@pytest.mark.parametrize("vocab_size", [1, 31, 32, 33, 100])
def test_token_bitmask_reference_matches_a_per_token_loop(vocab_size: int) -> None:
    gen = torch.Generator().manual_seed(vocab_size)
    logits = torch.randn(3, vocab_size, generator=gen)
    words = (vocab_size + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, words), generator=gen, dtype=torch.int64).to(torch.int32)
    bitmask[2] = -1  # a row without a grammar: all ones
    want = logits.clone()
    for r in range(3):
        for t in range(vocab_size):
            if not (int(bitmask[r, t // 32]) >> (t % 32)) & 1:
                want[r, t] = float("-inf")
    got = reference.apply_token_bitmask(logits.clone(), bitmask)
    assert torch.equal(got, want)
    assert torch.equal(ops.apply_token_bitmask(logits.clone(), bitmask), want)  # CPU dispatch: the twin


def test_the_vocabulary_encodes_bytes_as_the_tokenizer_does(vocab: GrammarVocab, tokenizer: Tokenizer,
                                                             tiny_model_dir: Path) -> None:
    assert vocab.tokenizer_json == (tiny_model_dir / "tokenizer.json").read_text(encoding="utf-8")
    assert vocab.vocab_size == VOCAB and vocab.kind == "byte_level"
    assert vocab.tokens[tokenizer.token_to_id("<think>")] == "" and vocab.tokens[VOCAB - 1] == ""
    assert set(vocab.end_ids) == {tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")}
    space = tokenizer.encode(" the", add_special_tokens=False).ids
    assert [vocab.tokens[t] for t in space] == [tokenizer.id_to_token(t) for t in space]
    assert vocab.tokens[tokenizer.encode(" ", add_special_tokens=False).ids[0]] == "Ġ"


def test_the_rows_of_a_draft_tree_get_the_masks_of_their_own_paths(backend: GrammarBackend,
                                                                   tokenizer: Tokenizer) -> None:
    """fill_rows over a tree (branches, a refused draft, a stop id, a crossed gate) equals one fill per
    row from a fresh matcher, and leaves the matcher at the committed state."""
    enc = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
    think_end = tokenizer.token_to_id("</think>")
    g = Grammar("json_schema", SCHEMA)
    committed = enc("x") + [think_end] + enc('{"color": "')
    stop = 7
    paths = [[], enc("re"), enc("red"), enc("gr"), enc("gree"), enc("x"), enc("re") + [stop]]
    state = GrammarState.create(backend, backend.compile(g), (stop,), True, think_end)
    state.advance(committed)
    got = torch.full((len(paths), 26), -1, dtype=torch.int32)
    assert state.fill_rows(got, [(i, committed + p) for i, p in enumerate(paths)]) == 5  # "x", stop: left alone
    for i, p in enumerate(paths):
        fresh = GrammarState.create(backend, backend.compile(g), (stop,), True, think_end)
        fresh.advance(committed + p)
        want = torch.full((1, 26), -1, dtype=torch.int32)
        if i < 5:
            assert fresh.fill(want, 0, committed + p)
        assert torch.equal(got[i], want[0]), i
    again = torch.full((1, 26), -1, dtype=torch.int32)
    assert state.fill(again, 0, committed) and torch.equal(again[0], got[0])
    gate = GrammarState.create(backend, backend.compile(g), (stop,), True, think_end)
    gate.advance(enc("x"))
    crossed = torch.full((2, 26), -1, dtype=torch.int32)
    assert gate.fill_rows(crossed, [(0, enc("x") + enc("y")), (1, enc("x") + [think_end] + enc('{"color": "'))]) == 1
    assert torch.equal(crossed[0], torch.full((26,), -1, dtype=torch.int32)) and torch.equal(crossed[1], got[0])


def test_a_broken_grammar_is_cached_as_its_error(vocab: GrammarVocab) -> None:
    calls = []

    class Counting(_Blocking):
        def _compile(self, grammar: Grammar) -> str:
            calls.append(grammar)
            raise RuntimeError("[06:00:00] /project/cpp/regex_converter.cc:94: Regex parsing error: Unclosed '['")

    b = Counting(vocab)
    g = Grammar("regex", "[0-9")
    for _ in range(2):
        with pytest.raises(GrammarCompileError, match=r"^grammar\.regex: Regex parsing error: Unclosed '\['$"):
            b.compile(g)
    with pytest.raises(GrammarCompileError, match=r"^grammar\.regex: Regex parsing error"):
        asyncio.run(b.compile_async(g))
    assert calls == [g]
    b.close()
