import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.sampling.logit_processors import (
    ForcedPrefix,
    RowContext,
    ThinkingBudget,
    ThinkState,
    apply_processors,
)
from common.serving.sampling_params import SamplingParams

# A fake tokenizer id map: ids are looked up by text, never GLM's real numbers.
IDS = {"<think>": 40, "</think>": 41, "\n": 7, "<|user|>": 30, "<|assistant|>": 31, "[gMASK]": 32,
       "<sop>": 33, "<|endoftext|>": 34}
S, E, NL, USER, ASSISTANT = IDS["<think>"], IDS["</think>"], IDS["\n"], IDS["<|user|>"], IDS["<|assistant|>"]
V = 48
BUDGET = ThinkingBudget(IDS["<think>"], IDS["</think>"], IDS["\n"])
T = 5  # an ordinary token


def _row(prompt, output, budget=None, **kw):
    return RowContext(SamplingParams(thinking_budget=budget, **kw), list(prompt), list(output))


def _forced(row):
    logits = torch.randn(1, V)
    before = logits.clone()
    apply_processors(logits, [row], BUDGET)
    finite = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    if len(finite) == V:
        assert torch.equal(logits, before)
        return None
    assert len(finite) == 1 and logits[0, finite[0]].item() == 0.0
    return finite[0]


def test_b1_under_budget_no_change():
    assert _forced(_row([S], [T, T + 1], budget=10)) is None


def test_b2_budget_reached_forces_newline():
    assert _forced(_row([S], [T] * 5, budget=5)) == NL


def test_b3_after_newline_forces_think_end():
    assert _forced(_row([S], [T] * 5 + [NL], budget=5)) == E


def test_b7_budget_zero():
    assert _forced(_row([S], [T], budget=0)) == NL
    # GLM-4.7: the prompt ends with <think>, nothing generated yet
    assert _forced(_row([ASSISTANT, S], [], budget=0)) == NL
    assert _forced(_row([ASSISTANT, S], [NL], budget=0)) == E
    assert _forced(_row([ASSISTANT, S], [NL, E], budget=0)) is None


def test_b10_multi_turn_history_with_closed_think():
    # GLM-4.5 multi-turn: history renders <think></think>; the model opens its own <think>.
    prompt = [IDS["[gMASK]"], IDS["<sop>"], USER, 1, 2, ASSISTANT, S, E, 3, 4, USER, 5, ASSISTANT]
    n = 6
    assert _forced(_row(prompt, [S] + [T] * n, budget=n)) == NL
    assert _forced(_row(prompt, [S] + [T] * n, budget=n + 1)) is None
    # before the model opens <think>, the history's closed block does not count
    assert _forced(_row(prompt, [T] * 50, budget=0)) is None


def test_glm47_prompt_ending_in_think_counts_output_tokens():
    prompt = [IDS["[gMASK]"], IDS["<sop>"], USER, 1, 2, ASSISTANT, S]
    assert _forced(_row(prompt, [T] * 3, budget=4)) is None
    assert _forced(_row(prompt, [T] * 4, budget=4)) == NL
    assert _forced(_row(prompt, [T] * 4 + [NL], budget=4)) == E
    assert _forced(_row(prompt, [T] * 4 + [NL, E], budget=4)) is None
    assert _forced(_row(prompt, [T] * 4 + [NL, E] + [T] * 10, budget=4)) is None


def test_natural_newline_at_budget_goes_straight_to_think_end():
    assert _forced(_row([S], [T, T, NL], budget=3)) == E


def test_no_budget_or_closed_block_is_untouched():
    assert _forced(_row([S], [T] * 100, budget=None)) is None
    assert _forced(_row([S, T, E], [T] * 100, budget=0)) is None
    assert _forced(_row([], [T] * 100, budget=0)) is None


def test_verify_rows_of_one_request_use_their_own_paths():
    # committed output ends with the bonus token (tree root); each row adds its path drafts
    prompt, committed = [ASSISTANT, S], [T, T]  # 2 thinking tokens so far, budget 3
    paths = {
        "root": [],
        "a": [T],  # 3 tokens: force newline
        "a/b": [T, NL],  # newline last: force </think>
        "c": [NL],  # 3 tokens ending in a natural newline: force </think>
        "c/d": [NL, E],  # closed: free
        "e/f": [E, T],  # closed earlier on the path: free
    }
    rows = [_row(prompt, committed + p, budget=3) for p in paths.values()]
    logits = torch.zeros(len(rows), V)
    apply_processors(logits, rows, BUDGET)
    forced = []
    for r in range(len(rows)):
        fin = torch.isfinite(logits[r]).nonzero().flatten().tolist()
        forced.append(None if len(fin) == V else fin)
    assert forced == [None, [NL], [E], [E], None, None]


def test_think_state_cache_matches_full_scan():
    prompt = [1, S, 2, E, 3, S, 4]
    output = [5, 6, 8]
    state = BUDGET.advance(ThinkState(), prompt[:4])
    assert state == ThinkState(4, None)
    state = BUDGET.advance(state, prompt[4:])
    assert state == ThinkState(7, 5)
    for budget in range(6):
        full = BUDGET.forced_token(_row(prompt, output, budget))
        cached = BUDGET.forced_token(RowContext(SamplingParams(thinking_budget=budget), prompt, output, state))
        assert full == cached
    assert BUDGET.forced_token(_row(prompt, output, 4)) == NL  # 4 tokens after the open <think>


@settings(max_examples=200, deadline=None)
@given(
    ids=st.lists(st.sampled_from([S, E, NL, T, T + 1]), max_size=40),
    split=st.integers(0, 40),
    cache=st.integers(0, 40),
    budget=st.integers(0, 8),
)
def test_budget_matches_definition(ids, split, cache, budget):
    split, cache = min(split, len(ids)), min(cache, len(ids))
    prompt, output = ids[:split], ids[split:]
    # definition: tokens after the most recent <think> that has no </think> after it
    open_at = None
    for i, t in enumerate(ids):
        if t == S:
            open_at = i
        elif t == E:
            open_at = None
    expected = None
    if open_at is not None and len(ids) - open_at - 1 >= budget:
        expected = NL if not output or output[-1] != NL else E
    row = _row(prompt, output, budget)
    assert BUDGET.forced_token(row) == expected
    state = BUDGET.advance(ThinkState(), ids[:cache])
    cached = RowContext(row.params, prompt, torch.tensor(output, dtype=torch.long), state)
    assert BUDGET.forced_token(cached) == expected


def test_repetition_penalty_hf_semantics():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, -1.0]])
    row = _row([0], [1, 1, 2], repetition_penalty=2.0)
    apply_processors(logits, [row], None)
    assert torch.allclose(logits, torch.tensor([[1.0, -4.0, 0.5, 0.5, -1.0]]))


def test_frequency_and_presence_penalties_on_output_only():
    logits = torch.zeros(1, 5)
    row = _row([3, 3, 3], [1, 1, 2], frequency_penalty=0.5, presence_penalty=0.25)
    apply_processors(logits, [row], None)
    # token 1: 2 * 0.5 + 0.25; token 2: 0.5 + 0.25; token 3 only in the prompt: untouched
    assert torch.allclose(logits, torch.tensor([[0.0, -1.25, -0.75, 0.0, 0.0]]))


def test_penalties_and_bias_per_row_and_tensor_histories():
    logits = torch.ones(3, 5)
    rows = [
        _row([0], [4], repetition_penalty=2.0, logit_bias={1: 3.0}),
        RowContext(SamplingParams(frequency_penalty=1.0, logit_bias={0: -1.5, 4: 0.5}),
                   torch.tensor([2]), torch.tensor([2, 2, 3])),
        _row([0, 1], [2]),
    ]
    apply_processors(logits, rows, None)
    assert torch.allclose(logits[0], torch.tensor([0.5, 4.0, 1.0, 1.0, 0.5]))
    assert torch.allclose(logits[1], torch.tensor([-0.5, 1.0, -1.0, 0.0, 1.5]))
    assert torch.equal(logits[2], torch.ones(5))


def test_min_tokens_masks_stops_and_eos_unless_ignored():
    eos = (9, 10)
    rows = [
        _row([1], [2], min_tokens=3, stop_token_ids=(5,)),
        _row([1], [2], min_tokens=3, stop_token_ids=(5,), ignore_eos=True),
        _row([1], [2, 3, 4], min_tokens=3, stop_token_ids=(5,)),
    ]
    logits = torch.zeros(3, 12)
    apply_processors(logits, rows, None, eos_token_ids=eos)
    masked = [torch.isinf(r).nonzero().flatten().tolist() for r in logits]
    assert masked == [[5, 9, 10], [5], []]


def test_forced_token_wins_over_bias_and_penalties():
    row = _row([S], [NL, NL], budget=0, logit_bias={E: -100.0, 3: 100.0}, repetition_penalty=2.0)
    logits = torch.randn(1, V)
    apply_processors(logits, [row], BUDGET)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [E]


@settings(max_examples=300, deadline=None)
@given(
    known=st.lists(st.sampled_from([S, E, NL, T]), max_size=30),
    split=st.integers(0, 30),
    unknown=st.integers(0, 1),
    budget=st.integers(0, 8),
)
def test_may_force_is_never_wrong_about_no_force(known, split, unknown, budget):
    """may_force() False (the overlapped decode then skips the budget) must hold for every value the
    unknown trailing output token (still being sampled on the device) can take; and with nothing
    unknown it is exact."""
    split = min(split, len(known))
    prompt, seen = known[:split], known[split:]
    state = BUDGET.scan(None, prompt, seen)
    total = len(known) + unknown
    verdict = BUDGET.may_force(budget, state, total)
    completions = [[]] if not unknown else [[t] for t in (S, E, NL, T)]
    forced = [BUDGET.forced_token(_row(prompt, seen + tail, budget)) for tail in completions]
    if not verdict:
        assert all(f is None for f in forced)
    if not unknown:
        assert verdict == (forced[0] is not None)


TC, NAME1, NAME2 = 20, 21, 22  # "<tool_call>" and a named tool's two name tokens
FORCED = ForcedPrefix(E, NL)


def _allowed(output, prefix=(TC,), reasoning_first=True, **kw):
    """The finite logits after every processor (None: the row is left free), values kept."""
    row = RowContext(SamplingParams(forced_prefix=prefix, reasoning_first=reasoning_first, **kw), [USER, S],
                     list(output))
    logits = torch.randn(1, V)
    before = logits.clone()
    apply_processors(logits, [row], None, forced=FORCED)
    finite = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    if len(finite) == V:
        assert torch.equal(logits, before)
        return None
    if not kw:
        assert torch.equal(logits[0, finite], before[0, finite])  # allowed tokens keep their logits
    return finite


def test_forced_tool_call_waits_for_the_reasoning_then_opens_the_call():
    assert _allowed([T, T]) is None                         # still reasoning: free
    assert _allowed([T, E]) == [NL, TC]                     # reasoning over: one newline or <tool_call>
    assert _allowed([T, E, NL]) == [TC]                     # the newline was used
    assert _allowed([T, E, TC]) is None                     # the call is open: free again
    assert _allowed([], reasoning_first=False) == [NL, TC]  # thinking off: from the first token
    assert _allowed([T, TC, T]) is None                     # <tool_call> while reasoning ends it (GLM parser)


def test_named_tool_forces_its_name_then_frees_the_row():
    named = (TC, NAME1, NAME2)
    assert _allowed([E], named) == [NL, TC]
    assert _allowed([E, TC], named) == [NAME1]
    assert _allowed([E, NL, TC, NAME1], named) == [NAME2]
    assert _allowed([E, TC, NAME1, NAME2], named) is None
    assert _allowed([E, TC, NAME1, NAME2, T, TC], named) is None  # a second call is the model's choice
    # the forced token survives a bias against it; other rows are untouched
    assert _allowed([E, TC], named, logit_bias={NAME1: -100.0}) == [NAME1]
    assert _allowed([T], ()) is None
