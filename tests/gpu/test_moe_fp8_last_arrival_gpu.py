"""The FP8 fused MoE's last-arrival quantisation of the intermediate on CUDA (triton_moe_fp8, channel
scales, decode sizes): gate_up's last program of each row block quantises the block's rows in the
same launch (common/ops/arrival.py) instead of triton_fp8's per-token launch after it.

At GLM-4.5-Air's H and I with 16 routed experts plus the shared one (top-8 + shared: the routed
experts hold several rows each from 4 tokens on, the shared expert whole blocks) and the shipped
Air table's tiles (BLOCK_N < I: the path is taken), bf16 activations: the intermediate's codes and
scales and the MoE output are bit-equal to GLMSERVE_LAST_ARRIVAL off, run after run (a program that
read another's tile before it landed would show as a differing code), and in a CUDA graph replayed
on new inputs; the counters are zero after every launch.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.numerics import fresh_seed  # noqa: F401 (autouse fixture)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"
ROUTED, H, INTER, TOP_K = 16, 4096, 1408, 8  # plus the shared expert, stacked last (common/model/moe.py)
TABLE_EXPERTS = 129  # the tuned Air table's E: 128 routed + shared
TOKENS = [1, 2, 4, 8]  # up to LAST_QUANT_MAX_TOKENS


def quantized(e: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian [e, n, k] weights (/ sqrt(k)) as E4M3 codes and per-row fp32 scales (amax / 448)."""
    codes = torch.empty(e, n, k, dtype=torch.float8_e4m3fn, device=DEV)
    scales = torch.empty(e, n, 1, device=DEV)
    for i in range(e):
        w = torch.randn(n, k, device=DEV) / k**0.5
        scales[i] = w.abs().amax(-1, keepdim=True) / 448
        codes[i] = (w / scales[i]).to(torch.float8_e4m3fn)
    return codes, scales


@pytest.fixture(scope="module")
def experts() -> tuple:
    """(w13, s13, w2, s2) of the 16 routed experts and the shared one."""
    return (*quantized(ROUTED + 1, 2 * INTER, H), *quantized(ROUTED + 1, H, INTER))


def inputs(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x bf16 with an outlier column and, from 2 tokens on, an all-zero token; weights; ids): the
    Triton router's top-8 of the 16 routed experts plus the shared column."""
    from common.ops import triton_moe as tm

    x = torch.randn(n, H, device=DEV)
    x[:, H // 7] *= 50
    if n > 1:
        x[n // 2] = 0
    weights, ids = tm.grouped_topk(torch.randn(n, ROUTED, device=DEV), 0.1 * torch.randn(ROUTED, device=DEV), TOP_K,
                                   1, 1, True, 2.5, 1)
    return x.bfloat16(), weights, ids


def air_config(n: int) -> dict:
    from common.ops import triton_moe_fp8 as tf8
    from common.ops.moe_configs import get_config

    cfg = get_config(n, TABLE_EXPERTS, 2 * INTER, H, TOP_K + 1, torch.bfloat16, torch.device(DEV), 0)
    if tf8.fuses_quant(INTER, 0, cfg["up"]["BLOCK_N"]):  # a tile holding whole rows: split them here
        cfg = dict(cfg, up=dict(cfg["up"], BLOCK_N=128))
    assert not tf8.fuses_quant(INTER, 0, cfg["up"]["BLOCK_N"])
    return cfg


def intermediate(x: torch.Tensor, ids: torch.Tensor, experts: tuple, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up's (act_q, act_s) as fused_moe_fp8 computes them."""
    from common.ops import triton_moe as tm
    from common.ops import triton_moe_fp8 as tf8
    from common.ops.pdl import pdl_enabled

    w13, s13 = experts[:2]
    bm = cfg["BLOCK_M"]
    if x.shape[0] == 1:
        sorted_ids, block_expert = None, ids.reshape(-1)
    else:
        sorted_ids, block_expert = tm.align_block_size(ids, ROUTED + 1, bm)
    x_q, x_s = tf8.quantize(x, 0)
    return tf8.gate_up(x_q, x_s, w13, s13, sorted_ids, block_expert, TOP_K + 1, 0, x.dtype, bm, cfg["up"],
                       pdl_enabled(x.device))


def moe(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: tuple, cfg: dict) -> torch.Tensor:
    from common.ops import triton_moe_fp8 as tf8

    return tf8.fused_moe_fp8_with_config(x, *experts, weights, ids, 0, cfg)


def assert_codes_equal(got: tuple, want: tuple, what: str) -> None:
    for g, w, name in zip(got, want, ("codes", "scales"), strict=True):
        assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)), f"{what}: intermediate {name} differ"


def counters_zero() -> bool:
    from common.ops import arrival

    torch.cuda.synchronize()
    return not arrival.counters(torch.device(DEV), 1).any()


@pytest.mark.parametrize("n", TOKENS)
def test_bit_equal_to_the_separate_launch(n: int, experts: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    from common.ops import arrival

    cfg = air_config(n)
    x, weights, ids = inputs(n)
    monkeypatch.setattr(arrival, "ENABLED", False)
    want_act, want = intermediate(x, ids, experts, cfg), moe(x, weights, ids, experts, cfg)
    monkeypatch.setattr(arrival, "ENABLED", True)
    for run in range(20):
        assert_codes_equal(intermediate(x, ids, experts, cfg), want_act, f"T={n} run {run}")
        assert torch.equal(moe(x, weights, ids, experts, cfg), want), f"T={n} run {run}: output differs"
    assert counters_zero()


@pytest.mark.parametrize("n", TOKENS)
def test_graph_replays_equal_the_separate_launch(n: int, experts: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """Captured once, replayed on new activations and routing: the counters are zero again after
    every launch, so each replay is bit-equal to the eager two-launch result."""
    from common.ops import arrival

    cfg = air_config(n)
    x, weights, ids = inputs(n)
    monkeypatch.setattr(arrival, "ENABLED", True)
    intermediate(x, ids, experts, cfg)  # warm-up: compiles, allocates the counters
    moe(x, weights, ids, experts, cfg)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        act = intermediate(x, ids, experts, cfg)
        out = moe(x, weights, ids, experts, cfg)
    for replay in range(50):
        for dst, src in zip((x, weights, ids), inputs(n), strict=True):
            dst.copy_(src)
        graph.replay()
        monkeypatch.setattr(arrival, "ENABLED", False)
        want_act, want = intermediate(x, ids, experts, cfg), moe(x, weights, ids, experts, cfg)
        monkeypatch.setattr(arrival, "ENABLED", True)
        assert_codes_equal(act, want_act, f"T={n} replay {replay}")
        assert torch.equal(out, want), f"T={n} replay {replay}: output differs"
    assert counters_zero()
