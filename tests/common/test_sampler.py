import math

import pytest
import torch

from common.sampling.sampler import (
    SamplingTensors,
    draw_uniforms,
    sample,
    sample_from_probs,
    target_probs,
)
from common.serving.sampling_params import SamplingParams


def _probs(logits, **kw):
    params = [SamplingParams(**kw)] * logits.shape[0]
    return target_probs(logits, *SamplingTensors.from_params(params, logits.device))


def _log(ps):
    return torch.tensor([[math.log(p) for p in ps]])


def test_greedy_is_argmax_with_lowest_id_on_ties():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, -0.5, -0.5]])
    out = sample(logits, [SamplingParams(temperature=0.0)] * 3)
    assert out.tokens.tolist() == [1, 0, 2]
    # top_k == 1 is greedy too, whatever the temperature
    out = sample(logits, [SamplingParams(temperature=2.0, top_k=1)] * 3, generator=torch.Generator().manual_seed(0))
    assert out.tokens.tolist() == [1, 0, 2]
    probs = _probs(logits, temperature=0.0)
    assert torch.equal(probs, torch.nn.functional.one_hot(torch.tensor([1, 0, 2]), 4).float())


def test_temperature_scales_softmax():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0]])
    for t in (0.5, 1.0, 2.0):
        assert torch.allclose(_probs(logits, temperature=t), torch.softmax(logits / t, -1), atol=1e-6)


def test_top_k_keeps_exactly_k_ties_to_lower_ids():
    p = _probs(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), top_k=2)
    e = torch.softmax(torch.tensor([3.0, 2.0]), -1)
    assert torch.allclose(p, torch.tensor([[e[0], e[1], 0.0, 0.0]]), atol=1e-6)
    p = _probs(torch.tensor([[1.0, 0.0, 1.0, 1.0]]), top_k=2)
    assert torch.allclose(p, torch.tensor([[0.5, 0.0, 0.5, 0.0]]))
    # off values
    for off in (0, -1):
        assert (_probs(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), top_k=off) > 0).all()


def test_top_p_smallest_prefix_reaching_p():
    logits = _log([0.5, 0.3, 0.15, 0.05])
    assert torch.allclose(_probs(logits, top_p=0.75), torch.tensor([[0.625, 0.375, 0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(_probs(logits, top_p=0.85), torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95, atol=1e-6)
    assert torch.allclose(_probs(logits, top_p=0.4), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert torch.allclose(_probs(logits, top_p=1.0), torch.tensor([[0.5, 0.3, 0.15, 0.05]]), atol=1e-6)


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    logits = _log([0.4, 0.3, 0.2, 0.1])
    # without top-k, top_p 0.5 keeps {0, 1}; after top-k 2 the masses are 4/7, 3/7 -> only {0}
    assert (_probs(logits, top_p=0.5) > 0).tolist() == [[True, True, False, False]]
    assert torch.allclose(_probs(logits, top_k=2, top_p=0.5), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_min_p_relative_to_max():
    logits = _log([0.5, 0.3, 0.15, 0.05])
    assert torch.allclose(_probs(logits, min_p=0.35), torch.tensor([[0.625, 0.375, 0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(_probs(logits, min_p=0.25), torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95, atol=1e-6)
    # after temperature: min-p sees the tempered probabilities (0.5^2 : 0.3^2 ... )
    p = _probs(logits, temperature=0.5, min_p=0.3)
    assert (p > 0).tolist() == [[True, True, False, False]]


def test_mixed_rows_use_their_own_parameters():
    logits = _log([0.5, 0.3, 0.15, 0.05]).repeat(3, 1)
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=1 + 2), SamplingParams(top_p=0.75)]
    p = target_probs(logits, *SamplingTensors.from_params(params, "cpu"))
    assert p[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert torch.allclose(p[1], torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=1e-6)
    assert torch.allclose(p[2], torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=1e-6)
    # repeat = request-major expansion for verify rows
    st = SamplingTensors.from_params(params, "cpu", repeat=2)
    assert st.temperature.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    assert st.top_k.tolist() == [-1, -1, 3, 3, -1, -1]


def test_sampling_frequencies_match_target():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    logits = torch.log(probs).repeat(40000, 1)
    out = sample(logits, [SamplingParams(top_p=0.95)] * 40000, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(out.tokens, minlength=5).float() / 40000
    expected = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0]) / 1.0  # top_p .95 keeps all four positives
    assert freq[4] == 0
    assert (freq - expected).abs().sum() / 2 < 0.01


def test_sample_from_probs_never_picks_zero_probability():
    probs = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0, 0.0]] * 4)
    u = torch.tensor([0.0, 0.2999, 0.3001, 0.99999994])
    assert sample_from_probs(probs, u).tolist() == [1, 1, 3, 3]
    # unnormalised rows work too
    assert sample_from_probs(probs * 3, u).tolist() == [1, 1, 3, 3]


def test_seeded_rows_reproducible_regardless_of_batch_position():
    torch.manual_seed(0)
    v = 50
    mine = torch.randn(v)
    params = SamplingParams(temperature=1.3, top_p=0.9, seed=1234)
    alone = []
    for step in range(20):
        out = sample(mine[None].clone(), [params], steps=[step])
        alone.append(out.tokens.item())
    assert len(set(alone)) > 1  # different steps draw different randomness
    crowd = []
    for step in range(20):
        logits = torch.randn(8, v)
        logits[5] = mine
        others = [SamplingParams(temperature=0.7, seed=s) for s in (1, 2, 3, 4, 5)]
        batch = others + [params] + [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)]
        out = sample(logits, batch, steps=[3, 1, 4, 1, 5, step, 9, 2],
                     generator=torch.Generator().manual_seed(step))
        crowd.append(out.tokens[5].item())
    assert crowd == alone


def test_seeded_rows_need_steps():
    with pytest.raises(ValueError, match="step"):
        sample(torch.randn(2, 5), [SamplingParams(seed=1), SamplingParams()])


def test_uniforms_per_row_and_shared_generator():
    u1 = draw_uniforms([None, 7, None], [0, 3, 0], 4, "cpu", torch.Generator().manual_seed(5))
    u2 = draw_uniforms([7], [3], 4, "cpu")
    assert torch.equal(u1[1], u2[0])
    assert ((u1 >= 0) & (u1 < 1)).all()
    u3 = draw_uniforms([None, 7, None], [0, 3, 0], 4, "cpu", torch.Generator().manual_seed(5))
    assert torch.equal(u1, u3)


def test_logprobs_are_pre_temperature_log_softmax():
    torch.manual_seed(3)
    logits = torch.randn(3, 10)
    params = [
        SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3),
        SamplingParams(temperature=0.5, top_k=4, logprobs=True, top_logprobs=2),
        SamplingParams(temperature=1.0),
    ]
    out = sample(logits, params, generator=torch.Generator().manual_seed(0))
    ref = torch.log_softmax(logits, -1)
    assert torch.allclose(out.logprobs, ref.gather(1, out.tokens[:, None]).squeeze(1))
    ids, values = out.top_logprobs
    assert ids.shape == (3, 3)
    ref_values, ref_ids = ref.sort(-1, descending=True)
    assert torch.equal(ids, ref_ids[:, :3])
    assert torch.allclose(values, ref_values[:, :3])
    assert out.tokens[0].item() == logits[0].argmax().item()
    assert out.tokens[1].item() in ref_ids[1, :4].tolist()  # top-k 4 respected


def test_no_logprobs_when_not_asked():
    out = sample(torch.randn(2, 6), [SamplingParams(temperature=0.0)] * 2)
    assert out.logprobs is None and out.top_logprobs is None


def test_forced_row_logprob_is_zero():
    logits = torch.full((1, 6), float("-inf"))
    logits[0, 4] = 0.0
    out = sample(logits, [SamplingParams(temperature=0.8, logprobs=True, top_logprobs=2)],
                 generator=torch.Generator().manual_seed(0))
    assert out.tokens.tolist() == [4]
    assert out.logprobs.tolist() == [0.0]
    assert out.top_logprobs[0][0, 0].item() == 4


def test_params_validation_names_the_field():
    SamplingParams().validate(100)
    cases = [
        ({"top_p": 0.0}, "sampling.top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "sampling.top_p"),
        ({"temperature": -1.0}, "sampling.temperature"),
        ({"temperature": float("nan")}, "sampling.temperature"),
        ({"top_k": -2}, "sampling.top_k"),
        ({"min_p": 1.5}, "sampling.min_p"),
        ({"seed": -1}, "sampling.seed"),
        ({"frequency_penalty": 3.0}, "sampling.frequency_penalty"),
        ({"presence_penalty": -2.5}, "sampling.presence_penalty"),
        ({"repetition_penalty": 0.0}, "sampling.repetition_penalty"),
        ({"repetition_penalty": 3.0}, "sampling.repetition_penalty must be in (0, 2]"),
        ({"logit_bias": {100: 1.0}}, "sampling.logit_bias keys"),
        ({"logit_bias": {3: 101.0}}, "sampling.logit_bias[3] must be in [-100, 100]"),
        ({"min_tokens": -1}, "sampling.min_tokens"),
        ({"max_tokens": 0}, "sampling.max_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "sampling.min_tokens must be in [0, max_tokens=4], got 5"),
        ({"stop_token_ids": (100,)}, "sampling.stop_token_ids[0] must be < vocab size 100"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs must be in [0, 20]"),
        ({"top_logprobs": 2}, "top_logprobs needs logprobs: true"),
        ({"thinking_budget": -1}, "thinking.budget must be in [0, 2**31)"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError) as ei:
            SamplingParams(**kw).validate(100)
        assert msg in str(ei.value), (kw, str(ei.value))


def test_params_flags():
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(top_k=1).is_greedy
    assert not SamplingParams(temperature=0.1).is_greedy
    assert hash(SamplingParams(logit_bias={1: 2.0})) == hash(SamplingParams())  # hashable despite the dict
