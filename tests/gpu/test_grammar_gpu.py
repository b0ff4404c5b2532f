"""Structured output on the GPU: the Triton token-bitmask kernel equals its twin at GLM's vocabulary,
inside a captured CUDA graph too (the mask an input buffer refilled between replays), and a graphed
plain decode step under a grammar gives the eager step's tokens. Run on the GPU machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from common.grammar.factory import make_backend
from common.grammar.state import GrammarState
from common.grammar.vocab import GrammarVocab
from common.ops import reference
from common.ops.triton_bitmask import apply_token_bitmask
from common.runtime.runner import ModelRunner
from common.sampling.token_sampler import SpecialIds, TokenSampler
from common.serving.sampling_params import Grammar, SamplingParams
from decode_worker.commit import StopRules
from decode_worker.scheduler import DecodeReq, ReqState
from decode_worker.steps import PlainStepper

pytestmark = pytest.mark.gpu
VOCAB = 151552


@pytest.mark.parametrize("rows", [1, 32, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bitmask_kernel_equals_the_twin_at_glm_vocab(rows: int, dtype: torch.dtype) -> None:
    logits = torch.randn(rows, VOCAB, device="cuda", dtype=dtype)
    words = (VOCAB + 31) // 32
    mask = torch.randint(-2**31, 2**31 - 1, (rows, words), device="cuda", dtype=torch.int64).to(torch.int32)
    want = reference.apply_token_bitmask(logits.clone(), mask)
    got = apply_token_bitmask(logits.clone(), mask)
    assert torch.equal(got, want)


def test_bitmask_kernel_replays_in_a_cuda_graph_with_the_mask_as_input() -> None:
    rows, words = 8, (VOCAB + 31) // 32
    logits_in = torch.randn(rows, VOCAB, device="cuda")
    logits = torch.empty_like(logits_in)
    mask = torch.full((rows, words), -1, device="cuda", dtype=torch.int32)
    logits.copy_(logits_in)
    apply_token_bitmask(logits, mask)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits.copy_(logits_in)
        apply_token_bitmask(logits, mask)
    for seed in range(3):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        mask.copy_(torch.randint(-2**31, 2**31 - 1, (rows, words), device="cuda", generator=gen,
                                 dtype=torch.int64).to(torch.int32))
        graph.replay()
        assert torch.equal(logits, reference.apply_token_bitmask(logits_in.clone(), mask))


@torch.inference_mode()
def test_graphed_decode_under_a_grammar_equals_eager(tiny_model_dir: Path) -> None:
    ids = SpecialIds.from_model_dir(str(tiny_model_dir))
    first = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json")).token_to_id("a")
    outs = []
    for graphs in (False, True):
        runner = ModelRunner(tiny_model_dir, "cuda", torch.bfloat16, 16, 128)
        if graphs:
            runner.capture_decode_graphs(4)
        backend = make_backend("xgrammar", GrammarVocab.from_model_dir(tiny_model_dir, runner.config.vocab_size))
        stepper = PlainStepper(runner, TokenSampler(ids), StopRules(ids.eos))
        params = SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=ids.eos,
                                grammar=Grammar("regex", r"[a-z]{2,6}( [a-z]{2,6}){3,6}\."))
        reqs = []
        for i in range(3):
            r = DecodeReq(f"r{i}", i, list(range(5 + i, 17 + i)), params, channel=None,  # type: ignore[arg-type]
                          state=ReqState.RUNNING)
            r.pages = list(range(1 + 8 * i, 9 + 8 * i))
            r.grammar = GrammarState.create(backend, backend.compile(params.grammar), params.stop_token_ids,
                                            False, None)
            r.output_ids = [first]  # the prefill's first token, valid under the grammar
            r.grammar.advance(r.output_ids)
            stepper.recompute(r)
            reqs.append(r)
        for _ in range(60):
            batch = [r for r in reqs if r.finish is None]
            if not batch:
                break
            stepper.step(batch)
        assert all(r.finish is not None and r.grammar.violation is None for r in reqs)
        outs.append([r.output_ids for r in reqs])
    assert outs[0] == outs[1]
