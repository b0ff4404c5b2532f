"""An FP8 checkpoint served end to end: the official channel format kept in FP8 through the real
loader, prefill and decode split, chunked prefill and EAGLE (3,1,4) give the greedy tokens of the
single-process FP8 run; a bf16 checkpoint quantised on load (--quantization fp8) the same."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from common.tools.tiny_model import make_tiny_model
from tests.e2e.conftest import Reference, free_pages, gateway, generate, wait_pages_free
from tests.e2e.test_speculative import spec_args


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("fp8") / "m", quantization="fp8-channel")


def test_fp8_checkpoint_split_chunked_eagle_equals_single_process(launch, fp8_dir: Path) -> None:
    reference = Reference(fp8_dir)
    assert reference.runner.model.model.layers[1].mlp.experts.w13.dtype == torch.float8_e4m3fn
    cluster = launch(fp8_dir, extra_worker_args=spec_args(3, 1, 4), extra_prefill_args=["--chunked-prefill-size", "16"])
    stub = gateway(cluster)
    before = free_pages(cluster)
    rng = random.Random(16)
    work = [([rng.randrange(700) for _ in range(rng.randrange(1, 50))], rng.randrange(2, 20)) for _ in range(6)]
    with ThreadPoolExecutor(len(work)) as pool:
        results = list(pool.map(lambda w: generate(stub, w[0], max_tokens=w[1], temperature=0.0, ignore_eos=True),
                                work))
    for (ids, max_tokens), got in zip(work, results):
        assert got.tokens == reference.greedy(ids, max_tokens), f"prompt of {len(ids)} tokens diverged"
        assert got.usage.spec_verify_steps > 0
    assert wait_pages_free(cluster, before) == before


def test_quantization_flag_serves_bf16_checkpoint_in_fp8(launch, tiny_model_dir: Path) -> None:
    from common.runtime.runner import ModelRunner

    cluster = launch(tiny_model_dir, extra_worker_args=["--quantization", "fp8"])
    reference = Reference(tiny_model_dir)
    reference.runner = ModelRunner(tiny_model_dir, "cpu", torch.float32, page_size=16, num_pages=64, quantize="fp8")
    ids = [3, 141, 59, 26, 535, 89, 79]
    got = generate(gateway(cluster), ids, max_tokens=12, temperature=0.0, ignore_eos=True)
    assert got.tokens == reference.greedy(ids, 12)
