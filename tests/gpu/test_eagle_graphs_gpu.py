"""EAGLE steps with the verify, draft-step and draft-extend forwards replayed through CUDA graphs give
the eager EAGLE steps' tokens (real EagleStepper, tiny model + MTP, bf16, Triton kernels). Run on the
GPU machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.forward.batch import ForwardBatch, TreeLayout
from common.model.config import SpecConfig
from common.runtime.cuda_graphs import SPEC_FORWARDS, Forward
from common.runtime.runner import ModelRunner
from common.sampling.token_sampler import SpecialIds, TokenSampler
from common.serving.sampling_params import SamplingParams
from decode_worker.commit import StopRules
from decode_worker.scheduler import DecodeReq, ReqState
from decode_worker.spec.eagle import EagleStepper
from decode_worker.spec.tree import ancestor_mask
from decode_worker.spec.verify import VerifyResult

pytestmark = pytest.mark.gpu
PAGE = 16
STEPS = 8


def _requests(stepper: EagleStepper, n: int) -> list[DecodeReq]:
    """n greedy requests with prompts of different lengths; target and draft KV rebuilt eagerly
    (recompute), on the same pages every call."""
    gen = torch.Generator().manual_seed(n)
    params = SamplingParams(temperature=0.0, max_tokens=10**6, ignore_eos=True)
    reqs = []
    for i in range(n):
        ctx = 20 + 37 * i
        prompt = torch.randint(0, 500, (ctx,), generator=gen).tolist()
        r = DecodeReq(f"r{i}", i, prompt, params, channel=None, state=ReqState.RUNNING)  # type: ignore[arg-type]
        r.pages = list(range(1 + i * 16, 1 + (i + 1) * 16))
        r.output_ids = [int(prompt[-1]) ^ 1]
        stepper.recompute(r)
        reqs.append(r)
    return reqs


def _decode(stepper: EagleStepper, n: int) -> tuple[list[list[int]], list[int]]:
    reqs = _requests(stepper, n)
    for _ in range(STEPS):
        stepper.step(reqs)
    return [r.output_ids for r in reqs], [r.accepted_drafts for r in reqs]


def _count_replays(runner: ModelRunner) -> list[int]:
    """Wrap every captured runner's run() to count replays: [verify, draft steps, draft extend]."""
    counts = [0, 0, 0]

    def wrap(g, slot: int):  # type: ignore[no-untyped-def]
        run = g.run

        def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            counts[slot] += 1
            return run(*args, **kwargs)
        g.run = counted

    for slot, kind in enumerate((Forward.VERIFY, Forward.DRAFT_STEP, Forward.DRAFT_EXTEND)):
        for g in runner.graphs[kind].by_window.values():
            wrap(g, slot)
    return counts


@pytest.mark.parametrize("s,k,n", [(3, 1, 4), (3, 2, 4)])
@torch.inference_mode()
def test_graph_eagle_steps_give_eager_tokens(tiny_model_dir: Path, s: int, k: int, n: int) -> None:
    runner = ModelRunner(tiny_model_dir, "cuda", torch.bfloat16, PAGE, 1 + 8 * 16, with_mtp=True)
    stepper = EagleStepper(runner, TokenSampler(SpecialIds(None, None, None, ())), StopRules(()),
                           SpecConfig("EAGLE", s, k, n))
    sizes = (1, 2, 3, 5)  # 5 > the largest bucket: falls back to the eager forwards
    eager = {b: _decode(stepper, b) for b in sizes}
    runner.capture_spec_graphs(3, s, k, n)
    assert set(runner.graphs) == set(SPEC_FORWARDS)
    assert all(runner.graphs[kind].batch_sizes == (1, 2, 3) for kind in SPEC_FORWARDS)
    assert sorted(runner.graphs[Forward.DRAFT_STEP].by_window) == [(level + 1) * k for level in range(s - 1)]
    assert list(runner.graphs[Forward.VERIFY].by_window) == [n]
    assert list(runner.graphs[Forward.DRAFT_EXTEND].by_window) == [s + 1]
    counts = _count_replays(runner)
    for b in sizes:
        before = list(counts)
        # a bucket of exactly b replays the eager kernels with the eager launch shapes: same tokens
        assert _decode(stepper, b) == eager[b], f"batch {b}"
        replayed = [c - p for c, p in zip(counts, before)]
        want = [STEPS, STEPS * (s - 1), STEPS] if b <= 3 else [0, 0, 0]
        assert replayed == want, f"batch {b}: {replayed} replays (verify, draft, extend), expected {want}"
    runner.release_graphs()
    assert runner.graphs == {}


@torch.inference_mode()
def test_padded_verify_graph_matches_eager_logits(tiny_model_dir: Path) -> None:
    """3 requests replay the verify bucket of 4 (one dummy request on page 0): logits and hidden to bf16
    rounding (the bucket plans its own split-K count), the same argmax where the choice is clear, and
    the real requests' pages hold the same K/V afterwards."""
    runner = ModelRunner(tiny_model_dir, "cuda", torch.bfloat16, PAGE, 1 + 8 * 16, with_mtp=True)
    stepper = EagleStepper(runner, TokenSampler(SpecialIds(None, None, None, ())), StopRules(()),
                           SpecConfig("EAGLE", 3, 2, 4))
    reqs = _requests(stepper, 3)
    dev = runner.device
    parents = torch.tensor([[-1, 0, 0, 1], [-1, 0, 1, 2], [-1, 0, 1, 1]], device=dev)
    mask = ancestor_mask(parents)
    tokens = torch.randint(0, 500, (3, 4), device=dev)
    batch = ForwardBatch.tree(tokens, mask.sum(-1) - 1, mask, [r.kv_len for r in reqs], [r.pages for r in reqs],
                              PAGE)
    eager_logits, eager_hidden = (t.float().clone() for t in runner.verify_forward(batch))
    kv_eager = runner.kv_pool.kv[:, :, 1:].float().clone()
    runner.capture_spec_graphs(4, 3, 2, 4)
    assert runner.graphs[Forward.VERIFY].find(batch) is not None
    logits, hidden = (t.float() for t in runner.verify_forward(batch))
    assert logits.shape == eager_logits.shape and hidden.shape == eager_hidden.shape
    assert float((logits - eager_logits).norm() / eager_logits.norm()) < 2e-2
    assert float((hidden - eager_hidden).norm() / eager_hidden.norm()) < 2e-2
    top2 = eager_logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.1
    assert torch.equal(logits.argmax(-1)[clear], eager_logits.argmax(-1)[clear])
    kv = runner.kv_pool.kv[:, :, 1:].float()
    assert float((kv - kv_eager).norm() / kv_eager.norm()) < 1e-2
    runner.release_graphs()


@pytest.mark.parametrize("s,k,n", [(3, 1, 4), (3, 2, 6)])
@torch.inference_mode()
def test_graph_draft_extend_gives_eager_draft_state(tiny_model_dir: Path, s: int, k: int, n: int) -> None:
    """The fixed-shape draft extend (requests that accepted 0, S and 1 drafts) replayed from its graph: the
    eager fixed-shape extend's top-k tokens, probabilities and draft hidden, bit for bit at a bucket of the
    batch's size (2 of buckets 1, 2, 4); to bf16 rounding when padded (3 requests in the bucket of 4)."""
    runner = ModelRunner(tiny_model_dir, "cuda", torch.bfloat16, PAGE, 1 + 8 * 16, with_mtp=True)
    stepper = EagleStepper(runner, TokenSampler(SpecialIds(None, None, None, ())), StopRules(()),
                           SpecConfig("EAGLE", s, k, n))
    reqs = _requests(stepper, 3)
    dev, B = runner.device, len(reqs)
    gen = torch.Generator(device=dev).manual_seed(2)
    paths = [[0], list(range(s + 1)), [0, 1]] if k == 1 else [[0], [0, 2, 4, 5], [0, 1]]
    accept_index = torch.full((B, s + 1), -1, device=dev)
    committed = torch.full((B, s + 1), -1, device=dev)
    for b, path in enumerate(paths):
        accept_index[b, :len(path)] = torch.tensor(path, device=dev)
        committed[b, :len(path)] = torch.randint(0, 500, (len(path),), device=dev, generator=gen)
    num_accepted = torch.tensor([len(p) - 1 for p in paths], device=dev)
    result = VerifyResult(accept_index, num_accepted, committed, committed[torch.arange(B, device=dev), num_accepted])
    hidden = torch.randn(B * n, runner.config.hidden_size, device=dev, generator=gen).to(torch.bfloat16)

    def extend(m: int):  # type: ignore[no-untyped-def]  # the extend of the first m requests
        layout = TreeLayout.build([r.kv_len for r in reqs[:m]], [r.pages for r in reqs[:m]], stepper.window, PAGE,
                                  dev)
        return stepper._draft_extend(layout, VerifyResult(*(t[:m] for t in result)), hidden[:m * n])

    eager2, eager3 = extend(2), extend(3)
    runner.capture_spec_graphs(4, s, k, n)
    assert set(runner.graphs) == set(SPEC_FORWARDS)
    assert runner.graphs[Forward.DRAFT_EXTEND].batch_sizes == (1, 2, 4)
    counts = _count_replays(runner)
    graph2, graph3 = extend(2), extend(3)
    assert counts == [0, 0, 2]
    for name, got, want in zip(("topk_p", "topk_idx", "hidden"), graph2, eager2):
        assert torch.equal(got, want), name
    torch.testing.assert_close(graph3.topk_p, eager3.topk_p, rtol=2e-2, atol=2e-3)
    got, want = graph3.hidden.float(), eager3.hidden.float()
    assert float((got - want).norm() / want.norm()) < 2e-2
    runner.release_graphs()
