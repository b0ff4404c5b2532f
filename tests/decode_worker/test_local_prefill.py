"""The decode worker's own prefill of a prompt suffix (steps.prefill_suffix, EagleStepper.prefill_local)
on the fp32 tiny model: starting from cached pages gives the first token, the target and MTP-layer
KV and the draft state of computing the whole prompt, within the chunked-prefill tolerance."""

from __future__ import annotations

from pathlib import Path

import torch

from common.model.config import SpecConfig
from common.runtime.runner import ModelRunner
from common.sampling.token_sampler import SpecialIds, TokenSampler
from common.serving.sampling_params import SamplingParams
from decode_worker.commit import StopRules
from decode_worker.scheduler import DecodeReq
from decode_worker.spec.eagle import EagleStepper
from decode_worker.steps import PlainStepper

PAGE = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=True)


def test_a_suffix_after_cached_pages_equals_the_whole_prompt_computed_here(tiny_model_dir: Path) -> None:
    runner = ModelRunner(tiny_model_dir, "cpu", torch.float32, PAGE, 64, with_mtp=True)
    sampler = TokenSampler(SpecialIds.from_model_dir(str(tiny_model_dir)))
    eagle = EagleStepper(runner, sampler, StopRules(()), SpecConfig("EAGLE", 3, 2, 4))
    plain = PlainStepper(runner, sampler, StopRules(()))
    prompt = torch.randint(0, 700, (14,), generator=torch.Generator().manual_seed(5)).tolist()
    layers = runner.kv_pool.num_layers  # the MTP layer included

    def run(stepper, cached_from: DecodeReq | None) -> DecodeReq:
        req = DecodeReq("r", 1, list(prompt), GREEDY, None)  # type: ignore[arg-type]
        fresh = runner.allocator.alloc(4 if cached_from is None else 2)
        req.pages = fresh if cached_from is None else cached_from.pages[:2] + fresh
        req.cached_len = 0 if cached_from is None else 2 * PAGE
        with torch.inference_mode():
            stepper.prefill_local(req)
        return req

    whole = run(eagle, None)
    suffix = run(eagle, whole)  # pages 0-1 (tokens 0..7, MTP KV included) come from `whole`
    assert whole.output_ids == suffix.output_ids and whole.kv_len == suffix.kv_len == 14
    assert abs(whole.logprobs[0][1] - suffix.logprobs[0][1]) < 1e-5
    kv = [runner.kv_pool.gather_tokens((0, layers), r.pages, 14) for r in (whole, suffix)]
    torch.testing.assert_close(kv[1], kv[0], atol=1e-5, rtol=1e-4)
    assert whole.draft.topk_idx.tolist() == suffix.draft.topk_idx.tolist()
    torch.testing.assert_close(suffix.draft.hidden, whole.draft.hidden, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(suffix.draft.topk_p, whole.draft.topk_p, atol=1e-5, rtol=1e-4)
    alone = run(plain, whole)  # the plain stepper samples the same first token, no draft state
    assert alone.output_ids == whole.output_ids and alone.draft is None


def test_the_first_token_computed_here_is_sampled_under_the_grammar(tiny_model_dir: Path) -> None:
    """A request whose prompt the decode worker completes itself gets its first token under its
    grammar, as the prefill worker would sample it (a regex of digits: the free greedy token is not
    one), and that token counts as sampled under the grammar."""
    from common.grammar.factory import make_backend
    from common.grammar.state import GrammarState
    from common.grammar.vocab import GrammarVocab
    from common.serving.sampling_params import Grammar

    runner = ModelRunner(tiny_model_dir, "cpu", torch.float32, PAGE, 64)
    sampler = TokenSampler(SpecialIds.from_model_dir(str(tiny_model_dir)))
    plain = PlainStepper(runner, sampler, StopRules(()))
    backend = make_backend("xgrammar", GrammarVocab.from_model_dir(tiny_model_dir, runner.config.vocab_size))
    grammar = Grammar("regex", "[0-9]{2}")
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, grammar=grammar)
    prompt = torch.randint(0, 700, (14,), generator=torch.Generator().manual_seed(5)).tolist()
    digits = {i for i in range(runner.config.vocab_size)
              if backend.vocab.tokens[i] and backend.vocab.tokens[i].isdigit()}
    for constrained in (False, True):
        req = DecodeReq("r", 1, list(prompt), params if constrained else GREEDY, None)  # type: ignore[arg-type]
        req.pages = runner.allocator.alloc(4)
        if constrained:
            req.grammar = GrammarState.create(backend, backend.compile(grammar), (), False, None)
        with torch.inference_mode():
            plain.prefill_local(req)
        runner.allocator.free(req.pages)
        assert (req.output_ids[0] in digits) == constrained, req.output_ids
    assert req.grammar.tokens == 1
