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
