"""The FP8 fused MoE (triton_moe_fp8) on CUDA at GLM-4.5-Air / GLM-4.5 shapes, full width and TP-8
slices (I = 176 and 192: K and N tails), against its torch twin reference.fused_moe_fp8 run on the
same GPU: the fp32 dequantised reference, with the activations quantised exactly as the kernel does.

Inputs are fresh each run: Gaussian weights quantised per output row (block 0) or per 128 x 128 tile
(block 128, where I is a multiple of 128), bf16 activations with an outlier column (x50) and an
all-zero token. The two differ by fp32 accumulation order (the FP8 tensor cores accumulate a whole K
loop between promotions under channel scales), a one-step move of an intermediate code where that
rounding lands near an E4M3 midpoint, and the bf16 output rounding: ~1e-2 by norm, bounded here by
0.05 (a wrong scale, layout or operand gives errors of order 1). Against exact activations the FP8
path is 0.03-0.05 off on such data; that is quantisation noise, which tests/common/test_fused_moe_fp8.py
bounds on the twin.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.numerics import assert_prefetch_equals_plain, fresh_seed, rel  # noqa: F401 (fresh_seed: autouse fixture)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"
FP8_TOL = 0.05
TOP_K = 8  # routed, plus the shared expert stacked after them (common/model/moe.py)
SHAPES = {"air": (128, 4096, 1408), "glm45": (160, 5120, 1536), "air-tp8": (128, 4096, 176),
          "glm45-tp8": (160, 5120, 192)}  # routed E, H, I per rank
LAYOUTS = [(shape, block) for shape in SHAPES for block in (0, 128) if SHAPES[shape][2] % max(block, 1) == 0]


def quantized(e: int, n: int, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian [e, n, k] weights (/ sqrt(k)) as E4M3 codes and fp32 scales, amax / 448 per row or
    per block x block tile, made a few experts at a time."""
    codes = torch.empty(e, n, k, dtype=torch.float8_e4m3fn, device=DEV)
    scales = torch.empty((e, n, 1) if not block else (e, n // block, k // block), device=DEV)
    for lo in range(0, e, 8):
        w = torch.randn(min(8, e - lo), n, k, device=DEV) / k**0.5
        if block:
            tiles = w.view(w.shape[0], n // block, block, k // block, block)
            s = tiles.abs().amax((2, 4)) / 448
            codes[lo : lo + 8] = (tiles / s[:, :, None, :, None]).view_as(w).to(torch.float8_e4m3fn)
        else:
            s = w.abs().amax(-1, keepdim=True) / 448
            codes[lo : lo + 8] = (w / s).to(torch.float8_e4m3fn)
        scales[lo : lo + 8] = s
    return codes, scales


@pytest.fixture(scope="module")
def experts() -> dict:
    return {}


def weights_for(experts: dict, shape: str, block: int) -> tuple:
    """(w13, s13, w2, s2) of E + 1 experts; one layout's weights on the GPU at a time."""
    if (shape, block) not in experts:
        experts.clear()
        e, h, inter = SHAPES[shape]
        experts[(shape, block)] = (*quantized(e + 1, 2 * inter, h, block), *quantized(e + 1, h, inter, block))
    return experts[(shape, block)]


def activations(n: int, h: int) -> torch.Tensor:
    x = torch.randn(n, h, device=DEV)
    x[:, h // 7] *= 50
    if n > 1:
        x[n // 2] = 0
    return x.bfloat16()


def route(n: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton router's top-8 + shared column; its ids must equal the reference router's."""
    from common.ops import reference as ref
    from common.ops import triton_moe as tm

    logits, bias = torch.randn(n, e, device=DEV), 0.1 * torch.randn(e, device=DEV)
    weights, ids = tm.grouped_topk(logits, bias, TOP_K, 1, 1, True, 2.5, 1)
    _, ref_ids = ref.grouped_topk(logits, bias, TOP_K, 1, 1, True, 2.5, 1)
    assert torch.equal(ids.sort(1).values, ref_ids.sort(1).values), "routing differs from the reference router"
    return weights, ids


def check(out: torch.Tensor, want: torch.Tensor, x: torch.Tensor) -> None:
    assert out.dtype == x.dtype and out.shape == x.shape
    assert rel(out, want) < FP8_TOL
    zero = (x == 0).all(dim=1)
    assert (out[zero] == 0).all(), "an all-zero token gives an all-zero output"


@pytest.mark.parametrize("n", [1, 3, 17, 64, 255, 2048])
@pytest.mark.parametrize(("shape", "block"), LAYOUTS)  # the outer loop: each layout's weights made once
def test_fused_moe_fp8(shape: str, block: int, n: int, experts: dict) -> None:
    """The tuned or heuristic config at every size class (one token, decode, mid, prefill)."""
    from common.ops import reference as ref
    from common.ops import triton_moe_fp8 as tf8

    e, h, _ = SHAPES[shape]
    w13, s13, w2, s2 = weights_for(experts, shape, block)
    x = activations(n, h)
    weights, ids = route(n, e)
    out = tf8.fused_moe_fp8(x, w13, s13, w2, s2, weights, ids, block)
    check(out, ref.fused_moe_fp8(x, w13, s13, w2, s2, weights, ids, block), x)


@pytest.mark.parametrize("n", [1, 4, 256, 2048])
def test_rows_summed_by_the_next_norm_equal_the_combine(n: int, experts: dict) -> None:
    """combine=False hands the rows [T,k,H] to the next add + norm (+ quantiser), which sums them as
    the combine does: the same bits as combine, then the norm (Air, channel scales)."""
    from common.ops import triton_fp8 as tf
    from common.ops import triton_moe_fp8 as tf8
    from common.ops import triton_norm as tn

    e, h, _ = SHAPES["air"]
    w13, s13, w2, s2 = weights_for(experts, "air", 0)
    x, residual = activations(n, h), activations(n, h)
    norm_w = (1 + 0.1 * torch.randn(h, device=DEV)).bfloat16()
    weights, ids = route(n, e)
    rows = tf8.fused_moe_fp8(x, w13, s13, w2, s2, weights, ids, 0, combine=False)
    out = tf8.fused_moe_fp8(x, w13, s13, w2, s2, weights, ids, 0)
    assert rows.shape == (n, TOP_K + 1, h)
    for got, want in zip(tf.fused_add_rms_norm_quant_fp8(rows, residual, norm_w, 1e-5, 0, True),
                         tf.fused_add_rms_norm_quant_fp8(out, residual, norm_w, 1e-5, 0, True), strict=True):
        assert torch.equal(got.view(torch.uint8) if got.dtype == torch.float8_e4m3fn else got,
                           want.view(torch.uint8) if want.dtype == torch.float8_e4m3fn else want)
    for got, want in zip(tn.fused_add_rms_norm(rows, residual, norm_w, 1e-5),
                         tn.fused_add_rms_norm(out, residual, norm_w, 1e-5), strict=True):
        assert torch.equal(got, want)


def _part(bn: int, bk: int, warps: int, stages: int, swap: bool = False, tma: bool = False, group_m: int = 1) -> dict:
    return {"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "num_warps": warps, "num_stages": stages, "swap": swap,
            "tma": tma}


CONFIGS = {  # the paths a table may pick that the heuristic does not
    "swap+tma": {"BLOCK_M": 16, "up": _part(64, 128, 4, 4, swap=True, tma=True), "down": _part(128, 128, 4, 4, swap=True)},
    "fused-row": {"BLOCK_M": 16, "up": _part(256, 128, 4, 3), "down": _part(64, 128, 4, 4, tma=True)},  # I <= 256
    "prefill-tma": {"BLOCK_M": 128, "up": _part(128, 128, 8, 3, tma=True, group_m=8),
                    "down": _part(128, 128, 8, 3, tma=True, group_m=8)},
}


@pytest.mark.parametrize(("shape", "block", "config", "n"), [  # grouped by layout: each one's weights made once
    ("air", 0, "swap+tma", 1), ("air", 0, "swap+tma", 17), ("air", 0, "prefill-tma", 255),
    ("air", 128, "prefill-tma", 2048), ("glm45", 128, "swap+tma", 3),
    ("air-tp8", 0, "fused-row", 1), ("air-tp8", 0, "swap+tma", 17),
    ("glm45-tp8", 0, "fused-row", 64), ("glm45-tp8", 0, "prefill-tma", 2048),
])
def test_fused_moe_fp8_configs(shape: str, block: int, config: str, n: int, experts: dict) -> None:
    from common.ops import reference as ref
    from common.ops import triton_moe_fp8 as tf8

    e, h, _ = SHAPES[shape]
    w13, s13, w2, s2 = weights_for(experts, shape, block)
    x = activations(n, h)
    weights, ids = route(n, e)
    out = tf8.fused_moe_fp8_with_config(x, w13, s13, w2, s2, weights, ids, block, CONFIGS[config])
    check(out, ref.fused_moe_fp8(x, w13, s13, w2, s2, weights, ids, block), x)


@pytest.mark.parametrize("n", [1, 17, 255])
@pytest.mark.parametrize(("shape", "block"), [("air-tp8", 0), ("air", 128)])
def test_graph_replay_equals_eager(shape: str, block: int, n: int, experts: dict) -> None:
    """The op reads no routing on the host: a graph captured once, replayed on new activations and
    routing, gives the eager result bit for bit."""
    from common.ops import triton_moe_fp8 as tf8

    e, h, _ = SHAPES[shape]
    w13, s13, w2, s2 = weights_for(experts, shape, block)
    x = activations(n, h)
    weights, ids = route(n, e)
    tf8.fused_moe_fp8(x, w13, s13, w2, s2, weights, ids, block)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tf8.fused_moe_fp8(x, w13, s13, w2, s2, weights, ids, block)
    for _ in range(3):
        x.copy_(activations(n, h))
        new_w, new_ids = route(n, e)
        weights.copy_(new_w)
        ids.copy_(new_ids)
        graph.replay()
        assert torch.equal(out, tf8.fused_moe_fp8(x, w13, s13, w2, s2, weights, ids, block))


@pytest.mark.parametrize("n", [1, 64, 1024])
def test_pdl_equals_plain_launch(n: int, experts: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Programmatic dependent launch changes when kernels start, never what they compute."""
    from common.ops import pdl
    from common.ops import triton_moe_fp8 as tf8

    if not pdl.supported(torch.device(DEV)):
        pytest.skip("programmatic dependent launch needs sm_90+")
    e, h, _ = SHAPES["air"]
    w13, s13, w2, s2 = weights_for(experts, "air", 0)
    x = activations(n, h)
    weights, ids = route(n, e)
    monkeypatch.setattr(pdl, "ENABLED", False)
    want = tf8.fused_moe_fp8(x, w13, s13, w2, s2, weights, ids)
    monkeypatch.setattr(pdl, "ENABLED", True)
    assert torch.equal(tf8.fused_moe_fp8(x, w13, s13, w2, s2, weights, ids), want)


@pytest.mark.parametrize("budget_mb", [0, 8, 1000])  # 1000: every program of both GEMMs prefetches
def test_weight_prefetch_changes_no_bit(budget_mb: int, experts: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """One token under PDL: gate_up runs the shared expert's block first and asks L2 for its rows
    before the wait, down reads the ids top-k wrote two launches back and asks for its experts' rows.
    Eagerly and in a CUDA graph of router -> MoE replayed on new logits, the output equals the plain
    launch's bit for bit at any prefetch budget."""
    from common.ops import pdl
    from common.ops import triton_moe as tm
    from common.ops import triton_moe_fp8 as tf8

    if not pdl.supported(torch.device(DEV)):
        pytest.skip("programmatic dependent launch needs sm_90+")
    e, h, _ = SHAPES["air"]
    w13, s13, w2, s2 = weights_for(experts, "air", 0)
    x = activations(1, h)
    logits, bias = torch.randn(1, e, device=DEV), 0.1 * torch.randn(e, device=DEV)

    def step() -> torch.Tensor:
        weights, ids = tm.grouped_topk(logits, bias, TOP_K, 1, 1, True, 2.5, 1)
        return tf8.fused_moe_fp8(x, w13, s13, w2, s2, weights, ids, 0, None, 1)

    assert_prefetch_equals_plain(step, lambda: logits.copy_(torch.randn_like(logits)), budget_mb, monkeypatch)


@pytest.mark.parametrize(("shape", "block"), [("air", 0), ("air", 128), ("glm45", 0)])
def test_one_token_down_quantises_bit_equal(shape: str, block: int, experts: dict,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """One token: the down GEMM quantising the intermediate as it loads it (DOWN_QUANT_TOKENS, off as
    served) gives the same bits as the quantiser's own launch, eagerly and in a graph under PDL."""
    from common.ops import triton_moe as tm
    from common.ops import triton_moe_fp8 as tf8

    e, h, _ = SHAPES[shape]
    w13, s13, w2, s2 = weights_for(experts, shape, block)
    x = activations(1, h)
    logits, bias = torch.randn(1, e, device=DEV), 0.1 * torch.randn(e, device=DEV)

    def step() -> torch.Tensor:
        weights, ids = tm.grouped_topk(logits, bias, TOP_K, 1, 1, True, 2.5, 1)
        return tf8.fused_moe_fp8(x, w13, s13, w2, s2, weights, ids, block, None, 1)

    cfg = tf8.get_config(1, w13.shape[0], w13.shape[1], h, TOP_K + 1, x.dtype, x.device, fp8_block=block)
    if block == 0 and shape == "air":  # Air's 1408-wide rows: no one-token tile holds a whole one
        assert not tf8.fuses_quant(w13.shape[1] // 2, block, cfg["up"]["BLOCK_N"])
    monkeypatch.setattr(tf8, "DOWN_QUANT_TOKENS", 0)
    want = step()
    monkeypatch.setattr(tf8, "DOWN_QUANT_TOKENS", 1)
    assert torch.equal(step(), want)
    assert_prefetch_equals_plain(step, lambda: logits.copy_(torch.randn_like(logits)), 16, monkeypatch)


@pytest.mark.parametrize(("shape", "block"), [("air", 0), ("air", 128), ("glm45", 0)])
def test_one_token_routed_in_gate_up(shape: str, block: int, experts: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """One token routed by the gate_up GEMM's programs (no top-k launch) picks grouped_topk's experts in
    its order with its weights to the last bit, and its rows equal the top-k launch's path to fp32
    rounding, eagerly and in a CUDA graph of the two under PDL replayed on new logits (down reads the ids
    gate_up wrote: before its wait only with a quantiser launch in between)."""
    from common.ops import reference as ref
    from common.ops import triton_moe as tm
    from common.ops import triton_moe_fp8 as tf8

    e, h, _ = SHAPES[shape]
    w13, s13, w2, s2 = weights_for(experts, shape, block)
    x = activations(1, h)
    terms, bias = torch.randn(3, 1, e, device=DEV), 0.1 * torch.randn(e, device=DEV)
    routing = ref.Routing(bias, TOP_K, 1, 1, True, 2.5, 1)
    weights = torch.empty(1, TOP_K + 1, device=DEV)
    ids = torch.empty(1, TOP_K + 1, dtype=torch.int32, device=DEV)

    def routed() -> torch.Tensor:
        return tf8.fused_moe_fp8_with_config(x, w13, s13, w2, s2, weights, ids, block, None, None, 1, False,
                                             (terms, routing))

    def launched() -> tuple[torch.Tensor, ...]:
        want_w, want_ids = tm.grouped_topk(terms, *routing)
        return tf8.fused_moe_fp8(x, w13, s13, w2, s2, want_w, want_ids, block, None, 1, False), want_w, want_ids

    for _ in range(3):
        out = routed()
        want, want_w, want_ids = launched()
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(weights, want_w, rtol=2e-7, atol=0)
        assert rel(out, want) < 1e-3
        terms.normal_()
    monkeypatch.setattr(tf8, "ROUTE_IN_GATE_UP", True)
    graph = torch.cuda.CUDAGraph()
    routed()  # compile outside the capture
    with torch.cuda.graph(graph):
        y = tf8.routed_moe_fp8(x, terms, routing, w13, s13, w2, s2, block, None, False)
    for _ in range(3):
        terms.normal_()
        graph.replay()
        want, _, _ = launched()
        assert rel(y, want) < 1e-3


def test_dispatch_takes_the_kernel_on_cuda() -> None:
    from common import ops
    from common.ops import triton_moe_fp8 as tf8

    assert ops.resolve("fused_moe_fp8", torch.device(DEV)) is tf8.fused_moe_fp8
