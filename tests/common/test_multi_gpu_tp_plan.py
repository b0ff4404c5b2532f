"""The multi-GPU TP run's placement and sizing rules (benchmarks/serving/run_multi_gpu.py; the run
itself needs 4 or 8 GPUs, or several minutes on the CPU)."""

from __future__ import annotations

import torch

from benchmarks.model_step.air_model import GLM45_FULL, weight_bytes_at
from benchmarks.serving.run_multi_gpu import TP_PAIRS, glm45_layers_that_fit, tp_bases
from common.model.layers import LocalRank


def test_decode_ranks_follow_the_prefill_ranks_or_share_the_last_gpus() -> None:
    assert TP_PAIRS == ((2, 2), (4, 2))
    assert tp_bases(4, 2, 2) == (0, 2)  # GPUs 0-1 prefill, 2-3 decode
    assert tp_bases(8, 4, 2) == (0, 4)  # disjoint on 8 GPUs
    assert tp_bases(4, 4, 2) == (0, 2)  # 4 GPUs: decode on 2-3, shared with prefill ranks 2-3
    assert tp_bases(8, 4, 4) == (0, 4)  # the GLM-4.5 deployment: 0-3 and 4-7


def test_glm45_fp8_depth_fits_the_gpu() -> None:
    h200, h100 = 141 * 10**9, 80 * 10**9
    assert glm45_layers_that_fit(h200, 4, GLM45_FULL) == 92  # 91 GB a rank: whole on an H200
    layers = glm45_layers_that_fit(h100, 4, GLM45_FULL)
    assert 50 < layers < 92
    fits = weight_bytes_at(GLM45_FULL, layers, torch.bfloat16, True, tp=LocalRank(0, 4))
    more = weight_bytes_at(GLM45_FULL, layers + 1, torch.bfloat16, True, tp=LocalRank(0, 4))
    assert fits <= 0.7 * h100 < more
