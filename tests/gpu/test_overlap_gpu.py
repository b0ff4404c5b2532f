"""The overlapped plain-decode loop on CUDA (tiny model, bf16, decode CUDA graphs): launching a step
never synchronises with the device, and the outputs equal the synchronous loop's. Run on the GPU
machine (the CPU twin of these checks is tests/decode_worker/test_overlap.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.runtime.runner import ModelRunner
from common.sampling.token_sampler import SpecialIds
from common.serving.sampling_params import SamplingParams
from tests.decode_worker.test_overlap import Spec, _greedy, _prompt, serve

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_env(tiny_model_dir: Path):
    runner = ModelRunner(tiny_model_dir, "cuda", torch.bfloat16, 16, 256)
    runner.capture_decode_graphs(8)
    yield runner, SpecialIds.from_model_dir(str(tiny_model_dir))
    runner.release_graphs()


def test_overlap_on_cuda_launches_without_sync_and_matches_sync(cuda_env) -> None:
    # max_tokens endings and arrivals only: both loops run the same batches step for step (a stop-token
    # ending adds one row to the overlapped loop's next step, which may pick another graph bucket and
    # so other bf16 rounding for its neighbours)
    specs = [Spec(f"g{i}", _prompt(60 + i, 20 + 9 * i), _greedy(max_tokens=12 + 5 * i), arrive=2 * i)
             for i in range(4)]
    specs += [Spec("seeded", _prompt(70, 33), SamplingParams(temperature=0.8, top_p=0.95, top_k=40, seed=3,
                                                             max_tokens=18, ignore_eos=True), arrive=1),
              Spec("seeded_plain", _prompt(71, 12), SamplingParams(temperature=1.0, seed=11, max_tokens=9,
                                                                   ignore_eos=True), arrive=5)]
    sync = serve(cuda_env, specs, overlap=False)
    over = serve(cuda_env, specs, overlap=True, strict=True)
    assert over.out == sync.out
    assert over.stepper.sync_steps == 0 and over.stepper.launched["g0"] == 11
    for run in (sync, over):
        assert run.free_after == run.free_before


def test_overlap_on_cuda_stop_and_abort_release_pages(cuda_env) -> None:
    specs = [Spec("eos", _prompt(80, 15), SamplingParams(temperature=0.0, max_tokens=40)),
             Spec("aborted", _prompt(81, 25), _greedy(max_tokens=40), abort_after=6, arrive=1),
             Spec("long", _prompt(82, 18), _greedy(max_tokens=30), arrive=2)]
    over = serve(cuda_env, specs, overlap=True, strict=True)
    assert over.out["aborted"][1] == ("error", "CANCELLED") and len(over.out["aborted"][0]) == 6
    assert over.out["long"][1] == ("finish", "length", None) and len(over.out["long"][0]) == 30
    assert over.free_after == over.free_before
