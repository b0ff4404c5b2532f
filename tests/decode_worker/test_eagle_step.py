"""EagleStepper on the fp32 tiny model (CPU): the fixed-shape draft extend against the variable-length
one, greedy EAGLE steps against plain decode steps, and logit-processor rows built only for the
requests that have a history-dependent processor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.forward.batch import TreeLayout
from common.model.config import SpecConfig
from common.runtime.runner import ModelRunner
from common.sampling.token_sampler import SpecialIds, TokenSampler
from common.serving.sampling_params import SamplingParams
from common.tools.agreeing_draft import make_agreeing_draft_model
from decode_worker.commit import StopRules
from decode_worker.scheduler import DecodeReq, ReqState
from decode_worker.spec.eagle import EagleStepper
from decode_worker.spec.verify import VerifyResult
from decode_worker.steps import PlainStepper

PAGE = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=10**6, ignore_eos=True)


@pytest.fixture(scope="module")
def agreeing_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_agreeing_draft_model(tiny_model_dir, tmp_path_factory.mktemp("agree") / "model")


def _runner(model_dir: Path) -> ModelRunner:
    return ModelRunner(model_dir, "cpu", torch.float32, PAGE, 256, with_mtp=True)


def _stepper(runner: ModelRunner, spec: tuple[int, int, int],
             sampler: TokenSampler | None = None) -> EagleStepper:
    sampler = sampler or TokenSampler(SpecialIds(None, None, None, ()))
    return EagleStepper(runner, sampler, StopRules(()), SpecConfig("EAGLE", *spec))


def _requests(runner: ModelRunner, params: list[SamplingParams],
              recompute) -> list[DecodeReq]:  # type: ignore[no-untyped-def]
    """Requests with prompts of different lengths, 12 pages each; KV rebuilt by `recompute` (target and
    draft for an EagleStepper, target only for a PlainStepper)."""
    gen = torch.Generator().manual_seed(len(params))
    reqs = []
    for i, p in enumerate(params):
        prompt = torch.randint(0, 300, (6 + 5 * i,), generator=gen).tolist()
        r = DecodeReq(f"r{i}", i, prompt, p, channel=None, state=ReqState.RUNNING)  # type: ignore[arg-type]
        r.pages = list(range(1 + 12 * i, 1 + 12 * (i + 1)))
        r.output_ids = [prompt[-1] ^ 1]
        recompute(r)
        reqs.append(r)
    return reqs


def _run(stepper, reqs: list[DecodeReq]) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Step the unfinished requests (the batch shrinks as they finish) until all are done."""
    for _ in range(64):
        batch = [r for r in reqs if r.finish is None]
        if not batch:
            return [r.output_ids for r in reqs]
        stepper.step(batch)
    raise AssertionError("requests did not finish")


def _draft_kv(runner: ModelRunner, req: DecodeReq, n: int) -> torch.Tensor:
    """The MTP layer's K/V of logical slots 0..n-1 of a request: [2, n, Hk, D]."""
    pool = runner.kv_pool
    slots = pool.slots(req.pages, 0, n)
    flat = pool.kv[runner.config.num_hidden_layers].reshape(2, -1, pool.kv_heads, pool.head_dim)
    return flat[:, slots].clone()


@pytest.mark.parametrize("spec,paths", [
    ((3, 1, 4), [[0], [0, 1, 2, 3], [0, 1]]),  # accepted 0, all S and 1 of the chain
    ((3, 2, 6), [[0, 2, 4, 5], [0], [0, 1, 3]]),  # tree paths: nodes off the first branch
])
@torch.inference_mode()
def test_fixed_extend_gives_the_variable_length_draft_state(tiny_model_dir: Path, spec,  # type: ignore[no-untyped-def]
                                                            paths) -> None:
    runner = _runner(tiny_model_dir)
    stepper = _stepper(runner, spec)
    reqs = _requests(runner, [GREEDY] * 3, stepper.recompute)
    s, n = spec[0], spec[2]
    B, H = len(reqs), runner.config.hidden_size
    gen = torch.Generator().manual_seed(1)
    committed = torch.full((B, s + 1), -1)
    accept_index = torch.full((B, s + 1), -1)
    for b, path in enumerate(paths):
        accept_index[b, :len(path)] = torch.tensor(path)
        committed[b, :len(path)] = torch.randint(0, 300, (len(path),), generator=gen)
    num_accepted = torch.tensor([len(p) - 1 for p in paths])
    result = VerifyResult(accept_index, num_accepted, committed, committed[torch.arange(B), num_accepted])
    hidden = torch.randn(B * n, H, generator=gen)  # the verify's target hidden of every tree node
    L = [r.kv_len for r in reqs]
    layout = TreeLayout.build(L, [r.pages for r in reqs], stepper.window, PAGE)

    fixed = stepper._draft_extend(layout, result, hidden)
    fixed_kv = [_draft_kv(runner, r, L[b] + len(paths[b])) for b, r in enumerate(reqs)]
    rows = [b * n + j for b, path in enumerate(paths) for j in path]
    varlen = stepper._extend_varlen(reqs, [committed[b, :len(p)].tolist() for b, p in enumerate(paths)], L,
                                    hidden[rows])
    for b, state in enumerate(varlen):
        assert torch.equal(fixed.topk_idx[b], state.topk_idx), f"request {b}"
        torch.testing.assert_close(fixed.topk_p[b], state.topk_p, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fixed.hidden[b], state.hidden, rtol=1e-5, atol=1e-5)
        # the real slots L..L+a hold the same draft K/V; the prefix was not touched
        torch.testing.assert_close(fixed_kv[b], _draft_kv(runner, reqs[b], L[b] + len(paths[b])),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", [(3, 1, 4), (2, 2, 4)])
@pytest.mark.parametrize("model", ["tiny", "agreeing"])
@torch.inference_mode()
def test_greedy_eagle_steps_give_plain_decode_tokens(tiny_model_dir: Path, agreeing_model_dir: Path, spec,
                                                     model: str) -> None:  # type: ignore[no-untyped-def]
    """Greedy, with and without processors, requests finishing at different steps: EAGLE == plain decode
    token for token (the random draft accepts ~nothing, the agreeing one ~everything)."""
    model_dir = tiny_model_dir if model == "tiny" else agreeing_model_dir
    params = [SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, repetition_penalty=1.5),
              SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logit_bias={7: 2.0}),
              SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)]
    runner = _runner(model_dir)
    plain = PlainStepper(runner, TokenSampler(SpecialIds(None, None, None, ())), StopRules(()))
    want = _run(plain, _requests(runner, params, plain.recompute))
    stepper = _stepper(runner, spec)
    reqs = _requests(runner, params, stepper.recompute)
    assert _run(stepper, reqs) == want
    if model == "agreeing":  # a full chain accepted at least once (no processor on request 0)
        assert reqs[0].accepted_drafts >= spec[0]


class _CountingSampler(TokenSampler):
    def __init__(self) -> None:
        super().__init__(SpecialIds(None, None, None, ()))
        self.calls: list[list[SamplingParams]] = []

    def process(self, logits, rows):  # type: ignore[no-untyped-def]
        self.calls.append([r.params for r in rows])
        return super().process(logits, rows)


class _AllRowsStepper(EagleStepper):
    """Processor rows for every request, as before the fast path."""

    def _has_processors(self, req: DecodeReq) -> bool:
        return True


@torch.inference_mode()
def test_processor_rows_only_for_requests_that_need_them(tiny_model_dir: Path) -> None:
    runner = _runner(tiny_model_dir)
    sampler = _CountingSampler()
    stepper = _stepper(runner, (3, 1, 4), sampler)
    reqs = _requests(runner, [GREEDY, GREEDY], stepper.recompute)
    stepper.step(reqs)
    assert sampler.calls == []  # greedy, no processor: no RowContext, no processing

    seeded = SamplingParams(temperature=0.9, top_p=0.8, seed=3, max_tokens=10, ignore_eos=True)
    penalty = SamplingParams(temperature=0.0, presence_penalty=1.0, max_tokens=10, ignore_eos=True)
    min_tokens = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(1, 2), max_tokens=10)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    params = [seeded, penalty, greedy, min_tokens]
    reqs = _requests(runner, params, stepper.recompute)
    sampler.calls.clear()
    got = _run(stepper, reqs)
    first = sampler.calls[0]
    assert first == [penalty] * 4 + [min_tokens] * 4  # N = 4 rows each, the other requests left out
    assert all(min_tokens not in call for call in sampler.calls[2:])  # 3 outputs reached by then
    reference = _AllRowsStepper(runner, TokenSampler(SpecialIds(None, None, None, ())), StopRules(()),
                                SpecConfig("EAGLE", 3, 1, 4))
    assert _run(reference, _requests(runner, params, reference.recompute)) == got
