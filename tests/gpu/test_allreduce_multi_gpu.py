"""The TP group's all-reduce between real GPUs: the peer-memory one-shot / two-shot paths and NCCL give
the fp32 sum to bf16 rounding and the same bits on every rank, also replayed from a CUDA graph
(benchmarks/kernels/bench_allreduce.py does the work; this asserts on it)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.kernels.bench_allreduce import PATHS, run_world

pytestmark = [pytest.mark.multi_gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]


@pytest.mark.parametrize("world", [2, 4, 8])
def test_tp_all_reduce_paths_agree(world: int) -> None:
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    result = run_world(world, [8 * 1024, 128 * 1024, 1024 * 1024], calls=5, reps=3)
    assert not result["errors"], result["errors"]
    assert result["custom_on"], "the peer-memory all-reduce did not set up (see the ranks' log)"
    for row in result["rows"]:
        for path in PATHS:
            if path in row:
                assert row[path]["rel_err"] < 1e-2, (world, row["bytes"], path)
                assert row[path]["identical_on_ranks"], (world, row["bytes"], path)
        assert "one_shot" in row or row["bytes"] > 128 * 1024
