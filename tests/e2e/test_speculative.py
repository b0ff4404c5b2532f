"""EAGLE through the real disaggregated path: greedy parity for chains and trees, full accept
length with an agreeing draft, and the sampled distribution."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from common.tools.agreeing_draft import make_agreeing_draft_model
from tests.e2e.conftest import free_pages, gateway, generate, wait_pages_free


def spec_args(s: int, k: int, n: int) -> list[str]:
    return ["--speculative-algorithm", "EAGLE", "--speculative-num-steps", str(s),
            "--speculative-eagle-topk", str(k), "--speculative-num-draft-tokens", str(n)]


@pytest.mark.parametrize("s,k,n", [(3, 1, 4), (1, 1, 2), (2, 1, 3), (3, 2, 4), (4, 4, 8)])
def test_greedy_with_speculation_equals_reference(launch, tiny_model_dir, reference, s, k, n):
    cluster = launch(tiny_model_dir, extra_worker_args=spec_args(s, k, n),
                     extra_prefill_args=["--chunked-prefill-size", "24"])
    stub = gateway(cluster)
    before = free_pages(cluster)
    rng = random.Random(s * 100 + k * 10 + n)
    for batch in (1, 8):
        work = [([rng.randrange(700) for _ in range(rng.randrange(1, 50))], rng.randrange(1, 30))
                for _ in range(batch)]
        # sampled requests share the batches (mixed greedy/sampled steps); only greedy ones are compared
        noise = [([rng.randrange(700) for _ in range(9)], 20) for _ in range(batch // 2)]
        with ThreadPoolExecutor(batch + len(noise)) as pool:
            sampled = [pool.submit(generate, stub, ids, max_tokens=m, temperature=1.0, seed=i, ignore_eos=True)
                       for i, (ids, m) in enumerate(noise)]
            greedy = list(pool.map(lambda w: generate(stub, w[0], max_tokens=w[1], temperature=0.0,
                                                      ignore_eos=True), work))
        for (ids, m), got in zip(work, greedy):
            assert got.tokens == reference.greedy(ids, m), f"(S,k,N)=({s},{k},{n}) diverged"
            if m > 1:
                assert got.usage.spec_verify_steps > 0
        assert all(f.result().finish == "length" for f in sampled)
    assert wait_pages_free(cluster, before) == before


def test_agreeing_draft_reaches_full_accept_length(launch, tiny_model_dir, tmp_path):
    model = make_agreeing_draft_model(tiny_model_dir, tmp_path / "agree")
    cluster = launch(model, extra_worker_args=spec_args(3, 1, 4))
    got = generate(gateway(cluster), [11, 12, 13, 14, 15], max_tokens=13, temperature=0.0, ignore_eos=True)
    # token 1 comes from prefill, then 3 verifies of 4 tokens each (3 accepted drafts + bonus)
    assert len(got.tokens) == 13
    assert got.usage.spec_verify_steps == 3
    assert got.usage.spec_accept_length == pytest.approx(4.0)


def _exact_joint(reference, prompt: list[int], top_k: int, depth: int) -> dict[tuple[int, ...], float]:
    """Exact distribution of the first `depth` sampled tokens (temperature 1, top-k), enumerated."""
    from common.forward.batch import ForwardBatch, SeqSpec

    runner = reference.runner

    def next_probs(ids: list[int]) -> torch.Tensor:
        pages = runner.allocator.alloc(-(-len(ids) // runner.page_size))
        try:
            spec = SeqSpec(ids, range(len(ids)), seq_len=len(ids), pages=pages)
            logits, _ = runner.forward(ForwardBatch.build([spec], runner.page_size, runner.device))
        finally:
            runner.allocator.free(pages)
        p = torch.softmax(logits[0].double(), -1)
        vals, idx = p.topk(top_k)
        out = torch.zeros_like(p)
        out[idx] = vals / vals.sum()
        return out

    joint = {(): 1.0}
    for _ in range(depth):
        nxt = {}
        for prefix, w in joint.items():
            p = next_probs(prompt + list(prefix))
            for t in p.nonzero().flatten().tolist():
                nxt[prefix + (t,)] = w * float(p[t])
        joint = nxt
    return joint


def test_speculative_sampling_matches_target_distribution(launch, tiny_model_dir, reference):
    prompt, top_k, depth, trials = [40, 41, 42, 43], 3, 3, 400
    exact = _exact_joint(reference, prompt, top_k, depth)
    cluster = launch(tiny_model_dir, extra_worker_args=spec_args(2, 2, 4))
    stub = gateway(cluster)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: generate(stub, prompt, max_tokens=depth, temperature=1.0, top_k=top_k,
                                                   seed=1000 + i, ignore_eos=True), range(trials)))
    runs = [tuple(r.tokens) for r in results]
    counts = {key: 0 for key in exact}
    for r in runs:
        assert r in counts, f"sampled a sequence of zero target probability: {r}"
        counts[r] += 1
    tv = 0.5 * sum(abs(counts[key] / trials - p) for key, p in exact.items())
    # 27 outcomes, 400 draws: sampling noise alone gives TV ~0.08; a sampler that followed the
    # draft (random MTP weights) or dropped the rejection rule lands far above 0.2
    assert tv < 0.2, f"total variation {tv:.3f} between speculative samples and the target distribution"
    # the speculative path really produced tokens 2..depth (one verify step per request)
    assert all(r.usage.spec_verify_steps >= 1 for r in results)
