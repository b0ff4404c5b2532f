"""Decode steps replayed through CUDA graphs give the eager decode's tokens (real PlainStepper,
tiny model, bf16, Triton kernels). Run on the GPU machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.forward.batch import ForwardBatch, SeqSpec
from common.runtime.cuda_graphs import Forward
from common.runtime.runner import ModelRunner
from common.sampling.token_sampler import SpecialIds, TokenSampler
from common.serving.sampling_params import SamplingParams
from decode_worker.commit import StopRules
from decode_worker.scheduler import DecodeReq, ReqState
from decode_worker.steps import PlainStepper

pytestmark = pytest.mark.gpu
PAGE = 16
STEPS = 10


def _requests(runner: ModelRunner, n: int) -> list[DecodeReq]:
    """n requests with prefilled prompts of different lengths (eager prefill, same pages every call)."""
    gen = torch.Generator().manual_seed(n)
    params = SamplingParams(temperature=0.0, max_tokens=10**6, ignore_eos=True)
    reqs = []
    for i in range(n):
        ctx = 20 + 37 * i
        prompt = torch.randint(0, 500, (ctx,), generator=gen).tolist()
        r = DecodeReq(f"r{i}", i, prompt, params, channel=None, state=ReqState.RUNNING)  # type: ignore[arg-type]
        r.pages = list(range(1 + i * 16, 1 + (i + 1) * 16))
        runner.forward(ForwardBatch.build([SeqSpec(prompt, range(ctx), ctx, r.pages, logit_rows=[])], PAGE,
                                          runner.device))
        r.kv_len, r.output_ids = ctx, [int(prompt[-1]) ^ 1]
        reqs.append(r)
    return reqs


def _decode(stepper: PlainStepper, n: int) -> list[list[int]]:
    reqs = _requests(stepper.runner, n)
    for _ in range(STEPS):
        stepper.step(reqs)
    return [r.output_ids for r in reqs]


@torch.inference_mode()
def test_graph_decode_gives_eager_tokens(tiny_model_dir: Path) -> None:
    runner = ModelRunner(tiny_model_dir, "cuda", torch.bfloat16, PAGE, 1 + 8 * 16)
    stepper = PlainStepper(runner, TokenSampler(SpecialIds(None, None, None, ())), StopRules(()))
    sizes = (1, 2, 4, 6)  # 6 > the largest bucket: falls back to the eager forward
    eager = {n: _decode(stepper, n) for n in sizes}
    runner.capture_decode_graphs(4)
    assert list(runner.graphs) == [Forward.DECODE] and runner.graphs[Forward.DECODE].batch_sizes == (1, 2, 4)
    for n in sizes:
        # a bucket of exactly n replays the eager kernels with the eager launch shapes: same tokens
        assert _decode(stepper, n) == eager[n], f"batch {n}"
    runner.release_graphs()


@torch.inference_mode()
def test_padded_graph_decode_matches_eager_logits(tiny_model_dir: Path) -> None:
    """3 requests replay the bucket of 4 (one dummy row on page 0): logits to bf16 rounding (the
    bucket plans its own split-K count), and the same greedy tokens where the choice is clear."""
    runner = ModelRunner(tiny_model_dir, "cuda", torch.bfloat16, PAGE, 1 + 8 * 16)
    reqs = _requests(runner, 3)
    batch = ForwardBatch.decode([r.pending for r in reqs], [r.kv_len for r in reqs], [r.pages for r in reqs],
                                PAGE, runner.device)
    eager = runner.decode_logits(batch).float().clone()
    runner.capture_decode_graphs(4)
    assert runner.graphs[Forward.DECODE].find(batch) is not None
    got = runner.decode_logits(batch).float()
    assert got.shape == eager.shape
    assert float((got - eager).norm() / eager.norm()) < 2e-2
    top2 = eager.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.1
    assert torch.equal(got.argmax(-1)[clear], eager.argmax(-1)[clear])
    runner.release_graphs()


def test_one_launch_batch_load_equals_twin() -> None:
    """The graph batch load (one Triton launch; from the second load of a shape on, straight to the
    compiled kernel's launcher) writes what the torch twins write, into a bucket left dirty by an
    earlier step: decode and tree batches, batch smaller than its bucket and equal to it."""
    from common.runtime.cuda_graphs import GraphRunner, load_batch, load_decode_batch, load_tree_batch

    dev = torch.device("cuda")
    fields = ("input_ids", "positions", "out_slots", "prefix_lens", "seq_lens", "page_table", "logit_rows", "mask")

    def dirty(static: ForwardBatch) -> ForwardBatch:
        for name in fields[:6]:
            getattr(static, name).fill_(99)
        if static.mask is not None:
            static.mask.fill_(False)
        return static

    gen = torch.Generator().manual_seed(3)
    for rep in range(3):  # the first load compiles, the later ones take the direct launch
        for n, bs in ((1, 1), (3, 4)):
            g = GraphRunner(lambda b: b.input_ids, [bs], 9, PAGE, dev)
            kv = torch.randint(0, 100, (n,), generator=gen).tolist()
            pages = [torch.randperm(200, generator=gen)[: k // PAGE + 1].tolist() for k in kv]
            batch = ForwardBatch.decode(torch.randint(0, 500, (n,), generator=gen).tolist(), kv, pages, PAGE, dev)
            want, got = dirty(g._static_batch(bs)), dirty(g._static_batch(bs))
            load_decode_batch(want, batch)
            load_batch(got, batch)
            for name in fields[:6]:
                assert torch.equal(getattr(got, name), getattr(want, name)), f"decode rep {rep} n={n}: {name}"
        n, bs, q = 2, 4, 4
        g = GraphRunner(lambda b: b.input_ids, [bs], 9, PAGE, dev, queries=q, window=q, outputs_per_seq=True)
        prefix = torch.randint(0, 60, (n,), generator=gen).tolist()
        pages = [torch.randperm(200, generator=gen)[: (p + q) // PAGE + 1].tolist() for p in prefix]
        tokens = torch.randint(0, 500, (n, q), generator=gen).to(dev)
        batch = ForwardBatch.tree(tokens, torch.randint(0, 4, (n, q), generator=gen).to(dev),
                                  (torch.rand(n, q, q, generator=gen) < 0.5).to(dev), prefix, pages, PAGE)
        batch.logit_rows = torch.tensor([1, 6], device=dev)
        want, got = dirty(g._static_batch(bs)), dirty(g._static_batch(bs))
        load_tree_batch(want, batch)
        want.logit_rows[:n].copy_(batch.logit_rows)
        want.logit_rows[n:].copy_(g._pad_rows[n:bs])
        load_batch(got, batch, g._pad_rows)
        for name in fields:
            assert torch.equal(getattr(got, name), getattr(want, name)), f"tree rep {rep}: {name}"
    # fields of another integer dtype or a strided page table (the twins take those) load right too
    g = GraphRunner(lambda b: b.input_ids, [2], 9, PAGE, dev)
    batch = ForwardBatch.decode([5, 9], [3, 40], [[7], [4, 6, 11]], PAGE, dev)
    batch.input_ids = batch.input_ids.to(torch.int32)
    batch.page_table = batch.page_table.t().contiguous().t()  # column-major
    got = dirty(g._static_batch(2))
    load_batch(got, batch)
    assert got.input_ids.tolist() == [5, 9] and got.page_table[:, :3].tolist() == [[7, 0, 0], [4, 6, 11]]
