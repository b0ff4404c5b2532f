"""Sampling from processed logits: greedy, temperature, top-k, top-p, min-p; seeds; logprobs.

Conventions:
- Input logits are already processed (`common.sampling.logit_processors.apply_processors`).
- Greedy rows (temperature 0 or top_k 1) take `argmax`; ties go to the lowest token id
  (torch.argmax returns the first maximal index on CPU and CUDA).
- The target distribution of a sampled row: softmax(logits / T), then top-k, then top-p, then min-p,
  renormalised after each (the filters run on the sorted distribution: top-k keeps exactly k ids,
  ties broken by lower id; top-p keeps the smallest prefix whose mass reaches top_p; min-p keeps
  p >= min_p * p_max).
- Randomness: one uniform per row and inverse-CDF sampling. A row with a seed gets its uniforms
  from its own CPU `torch.Generator` seeded by a 64-bit mix of (seed, step), where step is the
  number of output tokens the request had before this position. Its token therefore depends only on
  its own logits, seed and step, never on its batch neighbours (and equals across CPU and CUDA for
  equal probabilities). Rows without a seed share one generator (or torch's default).
- Logprobs are `log_softmax` of the processed logits *before* temperature and the filters: they
  describe the model plus processors (penalties, bias, forced thinking tokens), are defined for
  greedy rows too, and do not depend on the sampling knobs. Top logprobs use the same values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from common.forward.batch import to_device
from common.serving.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


class SamplingTensors(NamedTuple):
    temperature: torch.Tensor  # [R] fp32, 0 = greedy
    top_k: torch.Tensor  # [R] int64, <= 0 = off
    top_p: torch.Tensor  # [R] fp32
    min_p: torch.Tensor  # [R] fp32

    @classmethod
    def from_params(
        cls, params: Sequence[SamplingParams], device: torch.device | str, repeat: int = 1
    ) -> SamplingTensors:
        """Per-row tensors; `repeat` repeats each request's values (request-major, e.g. N verify rows).
        One non-blocking host->device copy (float64 holds every knob exactly): nothing waits."""
        knobs = torch.tensor([[p.temperature, p.top_k, p.top_p, p.min_p] for p in params],
                             dtype=torch.float64).reshape(-1, 4)
        if repeat != 1:
            knobs = knobs.repeat_interleave(repeat, dim=0)
        temperature, top_k, top_p, min_p = to_device(knobs.T.contiguous(), device)
        return cls(temperature.float(), top_k.long(), top_p.float(), min_p.float())


def uses_filter(params: Sequence[SamplingParams], vocab: int) -> bool:
    """Whether any of these rows filters (top-k below the vocabulary, top-p < 1 or min-p > 0): the
    `filtered` flag of target_probs, decided on the host."""
    return any(0 < p.top_k < vocab or p.top_p < 1 or p.min_p > 0 for p in params)


class SampleOutput(NamedTuple):
    tokens: torch.Tensor  # [R] int64
    logprobs: torch.Tensor | None  # [R] fp32 logprob of the chosen token; None when no row asked
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None  # (ids [R, n] int64, values [R, n] fp32)


def target_probs(
    logits: torch.Tensor,  # [R, V] fp32, processed
    temperature: torch.Tensor,  # [R] fp32
    top_k: torch.Tensor,  # [R] int64, <= 0 = off
    top_p: torch.Tensor,  # [R] fp32
    min_p: torch.Tensor,  # [R] fp32
    *,
    filtered: bool | None = None,
) -> torch.Tensor:  # [R, V] fp32, rows sum to 1
    """The distribution each row samples from; greedy rows are one-hot at the argmax.

    `filtered`: whether any row uses top-k/top-p/min-p (None: decided from the tensors, which costs
    a device sync; pass it from host-side params on the hot path).
    """
    vocab = logits.shape[1]
    greedy = (temperature <= 0) | (top_k == 1)  # [R]
    temp = torch.where(greedy, torch.ones_like(temperature), temperature)
    probs = torch.softmax(logits.float() / temp[:, None], dim=-1)
    k = torch.where(top_k <= 0, torch.full_like(top_k, vocab), top_k.clamp(max=vocab))
    if filtered is None:
        filtered = bool(((k < vocab) | (top_p < 1) | (min_p > 0)).any())
    if filtered:
        keep = _filter_mask(probs, k, top_p, min_p)
        probs = probs * keep
        probs = probs / probs.sum(dim=-1, keepdim=True)
    one_hot = torch.zeros_like(probs).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(greedy[:, None], one_hot, probs)


def _filter_mask(
    probs: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:  # [R, V] bool
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(probs.shape[1], device=probs.device)
    keep = rank[None, :] < k[:, None]  # top-k
    topk_p = sorted_p * keep
    topk_p = topk_p / topk_p.sum(dim=-1, keepdim=True)
    mass_before = topk_p.cumsum(dim=-1) - topk_p
    keep &= (mass_before < top_p[:, None]) | (top_p[:, None] >= 1)  # top-p on the top-k distribution
    keep &= sorted_p >= min_p[:, None] * sorted_p[:, :1]  # min-p: scale-free, so renorm-independent
    return torch.zeros_like(keep).scatter_(1, order, keep)


def sample_from_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF: the first id whose cumulative mass exceeds u * total. probs [R, V], u [R] in [0, 1).

    Never returns a zero-probability id (falls back to the last positive id if rounding runs out).
    """
    cdf = probs.cumsum(dim=-1)
    target = (u.to(cdf.dtype) * cdf[:, -1])[:, None]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    last_positive = (probs > 0).cumsum(dim=-1).argmax(dim=-1)
    return torch.where(idx >= probs.shape[1], last_positive, idx)


def seeded_generator(seed: int, step: int) -> torch.Generator:
    """CPU generator for (seed, step); a different stream per output position."""
    return torch.Generator().manual_seed(_mix64(seed, step))


def draw_uniforms(
    seeds: Sequence[int | None],
    steps: Sequence[int] | None,
    n: int,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # [R, n] fp32 in [0, 1)
    """n uniforms per row; seeded rows from `seeded_generator(seed, step)`, others from `generator`."""
    rows = len(seeds)
    gen_device = generator.device if generator is not None else device
    u = torch.rand(rows, n, generator=generator, device=gen_device).to(device)
    seeded = [i for i, s in enumerate(seeds) if s is not None]
    if seeded:
        if steps is None:
            raise ValueError("seeded rows need their step (number of output tokens so far)")
        own = torch.stack([torch.rand(n, generator=seeded_generator(seeds[i], steps[i])) for i in seeded])
        u[torch.tensor(seeded, device=device)] = own.to(device)
    return u


def sample(
    logits: torch.Tensor,  # [R, V] fp32, processed
    params: Sequence[SamplingParams],
    *,
    steps: Sequence[int] | None = None,  # per row: output tokens before this position (seeded rows)
    generator: torch.Generator | None = None,  # CPU generator shared by unseeded rows (None: torch's default)
) -> SampleOutput:
    """Never waits for the device: the per-row knobs and uniforms travel in one non-blocking copy, so
    the returned tensors stay on the logits' device (the overlapped decode step relies on this)."""
    assert logits.dim() == 2 and logits.shape[0] == len(params), "one SamplingParams per logits row"
    logprobs = top = None
    if any(p.logprobs for p in params):
        all_lp = torch.log_softmax(logits.float(), dim=-1)
    greedy_tokens = logits.argmax(dim=-1)
    if all(p.is_greedy for p in params):
        tokens = greedy_tokens
    else:
        st = SamplingTensors.from_params(params, logits.device)
        u = draw_uniforms([p.seed for p in params], steps, 1, "cpu", generator)[:, 0]
        flags = torch.tensor([float(p.is_greedy) for p in params])
        greedy, u = to_device(torch.stack((flags, u)), logits.device)
        probs = target_probs(logits, *st, filtered=uses_filter([p for p in params if not p.is_greedy],
                                                                logits.shape[1]))
        tokens = torch.where(greedy > 0, greedy_tokens, sample_from_probs(probs, u))
    if any(p.logprobs for p in params):
        logprobs = all_lp.gather(1, tokens[:, None]).squeeze(1)
        n = max(p.top_logprobs for p in params)
        if n > 0:
            values, ids = all_lp.topk(n, dim=-1)
            top = (ids, values)
    return SampleOutput(tokens, logprobs, top)


def _mix64(seed: int, step: int) -> int:
    """splitmix64 finaliser over (seed, step): well-spread 64-bit seeds for nearby inputs."""
    z = (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)
