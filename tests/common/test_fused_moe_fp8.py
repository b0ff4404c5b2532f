"""fused_moe_fp8: the torch twin against an independent per-assignment computation and against the
bf16 fused_moe on the dequantised weights; argument errors; the Triton kernel on the CPU interpreter.

Exact operands ("exact_case"): the GEMM inputs are chosen so that every sum the gate_up GEMM forms
is exact in fp32 in any order (codes that are multiples of 1/2, scales powers of two, each
activation row or group pinned to an amax of 7 * 2^j so that its scale is 2^j / 64 and its codes
are exact), and the gate outputs are 0 or at least 128 in magnitude, where fp32 silu is exactly
0 or the input. The intermediate and its E4M3 codes are then the same in every implementation;
what is left is fp32 rounding in the down GEMM and the combine (~1e-7 relative), so a 1e-5
bound catches any wiring error (scale indices, gate/up halves, rounding of the intermediate,
routing weights). Gaussian operands check the real silu and the quantisation noise.
"""

from __future__ import annotations

import sys

import pytest
import torch

from common import ops
from common.ops import reference as ref

TIGHT = 1e-5
# E4M3 rounds to within half a step, at most 2^-4 of a value, so a quantised operand's relative
# error by norm is <= 2^-4 / sqrt(3) (uniform rounding error). The twin quantises x (entering both
# gate and up, whose errors add in the product) and the intermediate: to first order the output's
# relative error is <= 3 * 2^-4 / sqrt(3) = 0.108 against exact activations (measured 0.027-0.049
# at H 1024-4096, one outlier column).
QUANT_NOISE = 0.11


@pytest.fixture(autouse=True)
def _fresh_seed() -> None:
    torch.manual_seed(torch.seed())


def rel(out: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out.double() - want.double()).norm() / want.double().norm())


def halves(*shape: int, top: float = 8.0) -> torch.Tensor:
    """Random multiples of 1/2 in [-top, top]: E4M3 values with at most 4 significant bits."""
    return torch.randint(int(-2 * top), int(2 * top) + 1, shape).float() / 2


def pow2(*shape: int, lo: int, hi: int) -> torch.Tensor:
    return 2.0 ** torch.randint(lo, hi + 1, shape).float()


def pinned(rows: int, k: int, group: int) -> torch.Tensor:
    """[rows, k] fp32: per row (group 0) or per run of `group` columns, halves in [-7, 7] times 2^j
    with one element at +-7 * 2^j: its quantisation scale is exactly 2^j / 64, its codes 64 * c."""
    g = group or k
    c = halves(rows, k // g, g, top=7.0)
    c[:, :, 0] = 7.0 * torch.sign(torch.randn(rows, k // g))
    return (c * pow2(rows, k // g, 1, lo=-2, hi=2)).reshape(rows, k)


def exact_case(n: int, e: int, k: int, h: int, inter: int, block: int, shared: int = 1,
               zero_row: bool = True) -> tuple:
    """(x fp32, w13, s13, w2, s2, weights, ids) as the module docstring describes; routed top-(k -
    shared) over e - shared experts plus the shared column(s); one all-zero token row."""
    x = pinned(n, h, block)
    if zero_row and n > 1:
        x[n // 2] = 0
    w13, w2 = halves(e, 2 * inter, h).to(torch.float8_e4m3fn), halves(e, h, inter).to(torch.float8_e4m3fn)
    s13_shape, s2_shape = ref.fp8_moe_scale_shapes(e, inter, h, block)
    gate_rows = s13_shape[1] // 2
    s13 = torch.cat((pow2(e, gate_rows, s13_shape[2], lo=11, hi=12),  # gate: |g| >= 128 unless 0
                     pow2(e, gate_rows, s13_shape[2], lo=-22, hi=-20)), dim=1)  # up: |silu(g) * up| small
    s2 = pow2(*s2_shape, lo=-12, hi=-8)
    weights, ids = ref.grouped_topk(torch.randn(n, e - shared), torch.zeros(e - shared), k - shared, 1, 1, True,
                                    1.5, shared)
    return x, w13, s13, w2, s2, weights, ids


def gaussian_case(n: int, e: int, k: int, h: int, inter: int, block: int) -> tuple:
    """Gaussian x (one outlier column x50) and weights quantised per row or per block x block tile."""
    x = torch.randn(n, h)
    x[:, h // 3] *= 50
    w13, s13 = quantize_weights(torch.randn(e, 2 * inter, h) / h**0.5, block)
    w2, s2 = quantize_weights(torch.randn(e, h, inter) / inter**0.5, block)
    weights, ids = ref.grouped_topk(torch.randn(n, e - 1), torch.zeros(e - 1), k - 1, 1, 1, True, 1.5, 1)
    return x, w13, s13, w2, s2, weights, ids


def quantize_weights(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w[E,N,K] fp32 -> (codes e4m3, scales [E,N,1] | [E,N/b,K/b]): amax / 448 per row or tile."""
    e, n, k = w.shape
    if not block:
        s = w.abs().amax(-1, keepdim=True) / 448
        return (w / s).to(torch.float8_e4m3fn), s
    tiles = w.reshape(e, n // block, block, k // block, block)
    s = tiles.abs().amax((2, 4)) / 448
    return (tiles / s[:, :, None, :, None]).reshape(e, n, k).to(torch.float8_e4m3fn), s


def dequantized(w: torch.Tensor, s: torch.Tensor, block: int) -> torch.Tensor:
    """w[E,N,K] e4m3 times the scale of each element, indexed as (n // b, k // b) or (n, 0)."""
    n, k = w.shape[1:]
    rows = torch.arange(n) // block if block else torch.arange(n)
    cols = torch.arange(k) // block if block else torch.zeros(k, dtype=torch.long)
    return w.double() * s.double()[:, rows[:, None], cols[None, :]]


def independent(x: torch.Tensor, w13: torch.Tensor, s13: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor,
                weights: torch.Tensor, ids: torch.Tensor, block: int) -> torch.Tensor:
    """The contract computed one assignment at a time, GEMMs in float64 on element-wise dequantised
    operands, the intermediate's arithmetic and quantisation in fp32 as specified; fp64 output."""
    def quant(v: torch.Tensor) -> torch.Tensor:  # v[K] fp32 -> dequantised fp64 [K]
        g = v.reshape(-1, block or v.numel())
        scale = g.abs().amax(-1, keepdim=True).clamp_min(ref.FP8_AMAX_FLOOR) / ref.FP8_MAX
        return ((g / scale).clamp(-448, 448).to(torch.float8_e4m3fn).double() * scale.double()).reshape(-1)

    inter = w2.shape[2]
    d13, d2 = dequantized(w13, s13, block), dequantized(w2, s2, block)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = quant(x[t].float())
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate_up = (d13[e] @ xt).float()  # [2I], exact for exact_case operands
            hidden = (torch.nn.functional.silu(gate_up[:inter]) * gate_up[inter:]).to(x.dtype).float()
            out[t] += float(weights[t, j]) * (d2[e] @ quant(hidden))
    return out


@pytest.mark.parametrize("block", [0, 16])
@pytest.mark.parametrize(("n", "k", "shared"), [(1, 4, 1), (6, 4, 1), (9, 3, 2), (5, 1, 0)])
def test_twin_matches_independent(block: int, n: int, k: int, shared: int) -> None:
    x, w13, s13, w2, s2, weights, ids = exact_case(n, 7, k, 64, 32, block, shared)
    out = ref.fused_moe_fp8(x, w13, s13, w2, s2, weights, ids, block)
    want = independent(x, w13, s13, w2, s2, weights, ids, block)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert rel(out, want) < TIGHT
    zero = (x == 0).all(dim=1)
    assert (out[zero] == 0).all(), "an all-zero token row gives an all-zero output row"


@pytest.mark.parametrize("block", [0, 32])
def test_twin_rounds_the_intermediate_to_the_activation_dtype(block: int) -> None:
    """bf16 x: the intermediate is rounded to bf16 before its quantisation, the output cast once."""
    x, w13, s13, w2, s2, weights, ids = exact_case(5, 6, 3, 64, 64, block)
    xb = x.bfloat16()  # exact: pinned() values have at most 4 significant bits
    out = ref.fused_moe_fp8(xb, w13, s13, w2, s2, weights, ids, block)
    want = independent(xb, w13, s13, w2, s2, weights, ids, block)
    assert out.dtype == torch.bfloat16 and rel(out, want) < 2.0**-8, "more than the output's bf16 rounding"
    unrounded = independent(x, w13, s13, w2, s2, weights, ids, block)  # the same inputs in fp32: no rounding
    assert rel(unrounded, want) > 1e-4, "the case must be sensitive to the intermediate's rounding"


@pytest.mark.parametrize("block", [0, 32])
@pytest.mark.parametrize("n", [1, 12])
def test_twin_within_quantisation_noise_of_bf16_moe(block: int, n: int) -> None:
    x, w13, s13, w2, s2, weights, ids = gaussian_case(n, 6, 4, 256, 64, block)
    d13, d2 = dequantized(w13, s13, block).float(), dequantized(w2, s2, block).float()
    out = ref.fused_moe_fp8(x, w13, s13, w2, s2, weights, ids, block)
    assert rel(out, ref.fused_moe(x, d13, d2, weights, ids)) < QUANT_NOISE
    out16 = ref.fused_moe_fp8(x.bfloat16(), w13, s13, w2, s2, weights, ids, block)
    assert rel(out16, ref.fused_moe(x.bfloat16(), d13.bfloat16(), d2.bfloat16(), weights, ids)) < QUANT_NOISE


def test_empty_batch_and_cpu_dispatch() -> None:
    x, w13, s13, w2, s2, weights, ids = gaussian_case(3, 5, 3, 64, 32, 0)
    assert ops.resolve("fused_moe_fp8", x.device) is ref.fused_moe_fp8
    assert torch.equal(ops.fused_moe_fp8(x, w13, s13, w2, s2, weights, ids),
                       ref.fused_moe_fp8(x, w13, s13, w2, s2, weights, ids))
    empty = ref.fused_moe_fp8(x[:0], w13, s13, w2, s2, weights[:0], ids[:0])
    assert empty.shape == (0, 64) and empty.dtype == x.dtype


def _bad_args() -> list:
    """(argument named in the message, keyword overrides) for the 5-expert, H=64, I=32 case."""
    fp8 = torch.float8_e4m3fn
    return [
        ("x", {"x": torch.randn(3, 64).half().to(torch.int8)}),
        ("x", {"x": torch.randn(3, 4, 64)}),
        ("w13", {"w13": torch.zeros(5, 64, 64, dtype=torch.bfloat16)}),
        ("w13", {"w13": torch.zeros(5, 64, 48, dtype=fp8)}),
        ("w2", {"w2": torch.zeros(5, 64, 16, dtype=fp8)}),
        ("w2", {"w2": torch.zeros(5, 64, 32, dtype=torch.float32)}),
        ("s13", {"s13": torch.ones(5, 64)}),
        ("s13", {"s13": torch.ones(5, 64, 1, dtype=torch.bfloat16)}),
        ("s2", {"s2": torch.ones(5, 32, 1)}),
        ("s13", {"block": 16}),  # channel scales given with a block size
        ("block", {"block": 24}),  # does not divide H = 64
        ("block", {"block": -1}),
        ("weights", {"weights": torch.ones(2, 3)}),
        ("ids", {"ids": torch.zeros(3, 3)}),
        ("ids", {"ids": torch.zeros(3, 2, dtype=torch.int32)}),
    ]


@pytest.mark.parametrize(("name", "override"), _bad_args())
def test_bad_arguments_are_named(name: str, override: dict) -> None:
    x, w13, s13, w2, s2, weights, ids = gaussian_case(3, 5, 3, 64, 32, 0)
    args = {"x": x, "w13": w13, "s13": s13, "w2": w2, "s2": s2, "weights": weights, "ids": ids, "block": 0} | override
    with pytest.raises(ValueError, match=rf"fused_moe_fp8: {name}\b"):
        ref.fused_moe_fp8(**args)


def test_triton_wrapper_refuses_what_the_kernel_cannot_run() -> None:
    pytest.importorskip("triton")
    from common.ops import triton_moe_fp8 as tf8

    x, w13, s13, w2, s2, weights, ids = gaussian_case(2, 5, 3, 96, 48, 0)
    s13b, s2b = (torch.ones(ref.fp8_moe_scale_shapes(5, 48, 96, 48)[i]) for i in (0, 1))
    with pytest.raises(ValueError, match="block=48 must be a power of two"):  # the twin runs it; the kernel's K step can't
        tf8.fused_moe_fp8(x, w13, s13b, w2, s2b, weights, ids, 48)
    assert ref.fused_moe_fp8(x, w13, s13b, w2, s2b, weights, ids, 48).shape == x.shape
    with pytest.raises(ValueError, match="w13"):
        tf8.fused_moe_fp8(x, w13.float(), s13, w2, s2, weights, ids)


def test_fp8_tables_are_named_apart_from_bf16() -> None:
    from common.ops import moe_configs as mc

    names = {mc.config_name(129, 2816, 4096, torch.bfloat16, "NVIDIA H100", b) for b in (None, 0, 128)}
    assert names == {"E=129,N=2816,H=4096,dtype=bfloat16,device=NVIDIA_H100.json",
                     "E=129,N=2816,H=4096,dtype=fp8_w8a8,device=NVIDIA_H100.json",
                     "E=129,N=2816,H=4096,dtype=fp8_w8a8_block128,device=NVIDIA_H100.json"}
    cpu = torch.device("cpu")
    for m in (1, 64, 4096):  # no FP8 table ships for this shape: the FP8 heuristic, not a bf16 table
        assert mc.get_config(m, 7, 64, 32, 9, torch.bfloat16, cpu, 0) == mc.default_config_fp8(m, 7, 64, 32, 9, 0, 4)
        block = mc.get_config(m, 7, 64, 32, 9, torch.bfloat16, cpu, 128)
        assert block["up"]["BLOCK_K"] == block["down"]["BLOCK_K"] == 128


def test_tuned_entries_serve_token_counts_near_them_by_ratio() -> None:
    """A table tuned at 1, 64 and 4096 tokens: 2048 takes the 4096 entry (not 64's decode tiles, which
    ran 0.6x bf16 there); a table without prefill entries leaves prefill sizes to the heuristic."""
    from common.ops import moe_configs as mc

    keys = [1, 64, 4096]
    assert [mc.nearest_tuned(keys, m) for m in (1, 8, 16, 32, 256, 512, 1024, 2048, 8192, 65536)] == \
        [1, 1, 64, 64, 64, 64, 4096, 4096, 4096, None]
    assert mc.nearest_tuned([1, 64], 2048) is None and mc.nearest_tuned([1, 64], 512) == 64
    assert mc.nearest_tuned([], 8) is None


def test_triton_interpreted() -> None:
    pytest.importorskip("triton")
    from tests.common.test_triton_interpret import run_interpreted

    run_interpreted(__file__, "moe_fp8", 150)


def test_routed_twin_is_top_k_then_the_fused_moe() -> None:
    x, w13, s13, w2, s2, _, _ = gaussian_case(3, 7, 4, 64, 32, 0)
    terms, bias = torch.randn(2, 3, 6), torch.randn(6) / 4
    routing = ref.Routing(bias, 3, 2, 1, True, 2.5, 1)
    weights, ids = ref.grouped_topk(terms, *routing)
    want = ref.fused_moe_fp8(x, w13, s13, w2, s2, weights, ids, 0, None, 1, False)
    assert torch.equal(ops.routed_moe_fp8(x, terms, routing, w13, s13, w2, s2, 0, None, False), want)


def test_triton_routing_in_gate_up_interpreted() -> None:
    pytest.importorskip("triton")
    from tests.common.test_triton_interpret import run_interpreted

    run_interpreted(__file__, "moe_fp8_routed", 150)


# --------------------------------------------------------------------------- subprocess side
def _group_moe_fp8() -> None:
    """The kernel against the twin: exact operands to 1e-5 (fp32 accumulation order only), through
    the heuristic configs and explicit ones covering the intermediate's quantisation in the gate_up
    epilogue and by triton_fp8, swapped operands, TMA weight tiles, K and N tails, several blocks per
    expert (GROUP_M), the one-token path; Gaussian operands to 2e-2 (there fp32 rounding may move an
    intermediate code by one E4M3 step)."""
    from common.ops import triton_moe_fp8 as tf8

    def cfg(bm: int, up: tuple, down: tuple) -> dict:  # (BLOCK_N, BLOCK_K, GROUP_M, swap, tma) per GEMM
        def part(bn: int, bk: int, gm: int, swap: bool, tma: bool) -> dict:
            return {"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm, "num_warps": 4, "num_stages": 2, "swap": swap,
                    "tma": tma}
        return {"BLOCK_M": bm, "up": part(*up), "down": part(*down)}

    fused_swap = cfg(16, (64, 32, 1, True, True), (32, 32, 1, True, False))  # BN >= I: quantised in gate_up
    blocks = cfg(16, (32, 32, 2, False, False), (64, 32, 2, False, True))  # I = 48: N and K tails
    narrow = cfg(16, (16, 32, 1, False, False), (32, 32, 1, True, False))  # block 32 > BLOCK_N: quantised apart
    cases = [  # (n, e, k, h, inter, block, config, also in fp16); e = 4: the shared expert spans two blocks
        (5, 6, 3, 64, 32, 0, None, True), (1, 6, 4, 64, 32, 0, None, False), (7, 6, 3, 64, 64, 0, fused_swap, False),
        (1, 6, 3, 64, 64, 0, fused_swap, True), (20, 4, 3, 64, 48, 0, blocks, False),
        (5, 6, 3, 64, 64, 32, None, False), (1, 6, 4, 64, 64, 32, None, False), (7, 6, 3, 64, 64, 32, fused_swap, True),
        (20, 4, 3, 64, 64, 16, blocks, True), (6, 6, 3, 64, 64, 32, narrow, False),
    ]
    for n, e, k, h, inter, block, config, half in cases:
        for dt in (torch.float32, torch.float16) if half else (torch.float32,):
            x, w13, s13, w2, s2, weights, ids = exact_case(n, e, k, h, inter, block)
            if dt == torch.float16:  # keep silu(g) * up inside fp16's range
                s13[:, s13.shape[1] // 2 :] /= 2**12
            x = x.to(dt)
            out = tf8.fused_moe_fp8_with_config(x, w13, s13, w2, s2, weights, ids, block, config)
            want = ref.fused_moe_fp8(x, w13, s13, w2, s2, weights, ids, block)
            err = rel(out, want)
            name = f"exact T={n} E={e} k={k} I={inter} block={block} cfg={'auto' if config is None else config['up']['BLOCK_N']}"
            print(f"{name:50s} {dt!s:14s} rel {err:.2e}")
            tol = TIGHT if dt == torch.float32 else 2.0**-10  # fp16 output: its own rounding
            assert out.dtype == dt and err < tol, f"{name}: rel error {err:.2e} >= {tol}"
            assert (out[(x == 0).all(dim=1)] == 0).all()
    # one token: the down GEMM quantising the intermediate as it loads it (DOWN_QUANT_TOKENS), where
    # gate_up's epilogue cannot (BLOCK_N < I); the quantiser's codes and scales, so the same bits as
    # with the quantiser's own launch. I = 600: the row's amax over two ROW_CHUNKs and a K tail.
    served = tf8.DOWN_QUANT_TOKENS
    for block, inter in ((0, 64), (32, 64), (0, 600)):
        x, w13, s13, w2, s2, weights, ids = gaussian_case(1, 6, 4, 64, inter, block)
        outs = []
        for tokens in (1, 0):
            tf8.DOWN_QUANT_TOKENS = tokens
            outs.append(tf8.fused_moe_fp8_with_config(x, w13, s13, w2, s2, weights, ids, block, narrow))
        tf8.DOWN_QUANT_TOKENS = served
        assert torch.equal(outs[0], outs[1]), f"one token, block={block} I={inter}: quantised in down differs"
        err = rel(outs[0], ref.fused_moe_fp8(x, w13, s13, w2, s2, weights, ids, block))
        print(f"one token, intermediate quantised in down, block={block} I={inter}: bit-equal, rel {err:.2e}")
        assert err < 2e-2
        x_q, x_s = tf8.quantize(x, block)
        act, act_s = tf8.gate_up(x_q, x_s, w13, s13, None, ids.reshape(-1).to(torch.int32), 4, block, x.dtype, 16,
                                 narrow["up"], False, 1, down_quantises=True)
        assert act_s is None and act.dtype == x.dtype  # left unquantised for down
    for block in (0, 32):
        x, w13, s13, w2, s2, weights, ids = gaussian_case(6, 6, 4, 64, 64, block)
        err = rel(tf8.fused_moe_fp8(x, w13, s13, w2, s2, weights, ids, block),
                  ref.fused_moe_fp8(x, w13, s13, w2, s2, weights, ids, block))
        print(f"gaussian block={block} rel {err:.2e}")
        assert err < 2e-2


def _group_moe_fp8_routed() -> None:
    """One token routed by the gate_up GEMM's programs (ROUTE) against grouped_topk's kernel then the
    fused MoE: the same ids in the same (descending) order, the weights to fp32 rounding of their
    renormalising sum, the output to the twin's bound; with the intermediate quantised apart (a launch
    between gate_up and down) and in gate_up's epilogue, groups, several logit terms, exact ties
    (taken by the lower id), the routing switch off."""
    from common.ops import triton_moe as tm
    from common.ops import triton_moe_fp8 as tf8
    from tests.common.test_triton_interpret import poisoned

    part = {"BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 2, "tma": False}
    narrow = {"BLOCK_M": 16, "up": dict(part, BLOCK_N=16, swap=False), "down": dict(part, BLOCK_N=32, swap=True)}
    fused = {"BLOCK_M": 16, "up": dict(part, BLOCK_N=64, swap=True), "down": dict(part, BLOCK_N=32, swap=False)}
    cases = [  # (routed experts, top_k, n_group, topk_group, logit terms, block, config, ties)
        (6, 3, 1, 1, 1, 0, narrow, False), (6, 3, 1, 1, 3, 32, narrow, False), (8, 4, 4, 2, 2, 0, fused, False),
        (12, 2, 1, 1, 1, 32, fused, False), (6, 3, 1, 1, 1, 0, narrow, True), (8, 3, 2, 1, 1, 0, narrow, True),
    ]
    for e, k, groups, topk_group, splits, block, config, ties in cases:
        x, w13, s13, w2, s2, _, _ = gaussian_case(1, e + 1, k + 1, 64, 64, block)
        terms = torch.zeros(splits, 1, e) if ties else torch.randn(splits, 1, e)
        bias = torch.zeros(e) if ties else torch.randn(e) / 4
        routing = ref.Routing(bias, k, groups, topk_group, True, 2.5, 1)
        want_w, want_ids = tm.grouped_topk(terms, *routing)
        weights, ids = poisoned(torch.empty)((1, k + 1)), poisoned(torch.empty)((1, k + 1), dtype=torch.int32)
        out = tf8.fused_moe_fp8_with_config(x, w13, s13, w2, s2, weights, ids, block, config, None, 1, True,
                                            (terms, routing))
        name = f"E={e} k={k} groups={groups}/{topk_group} terms={splits} block={block} up BN={config['up']['BLOCK_N']}"
        assert torch.equal(ids, want_ids), f"{name}: ids {ids.tolist()} against grouped_topk's {want_ids.tolist()}"
        assert torch.allclose(weights, want_w, rtol=1e-6, atol=0), f"{name}: weights {weights} against {want_w}"
        err = rel(out, ref.fused_moe_fp8(x, w13, s13, w2, s2, want_w, want_ids, block))
        print(f"routed in gate_up {name}: ids equal, rel {err:.2e}")
        assert err < 2e-2
        if ties:  # every score equal: the lowest ids, in the first group
            assert ids[0].tolist() == [*range(k), e]
    served = tf8.ROUTE_IN_GATE_UP
    x, w13, s13, w2, s2, _, _ = gaussian_case(1, 7, 4, 64, 64, 0)
    terms, routing = torch.randn(2, 1, 6), ref.Routing(torch.randn(6) / 4, 3, 1, 1, True, 2.5, 1)
    outs = []
    for on in (True, False):
        tf8.ROUTE_IN_GATE_UP = on
        outs.append(tf8.routed_moe_fp8(x, terms, routing, w13, s13, w2, s2, 0, None, False))
    tf8.ROUTE_IN_GATE_UP = served
    err = rel(outs[0], outs[1])
    print(f"routed_moe_fp8 in gate_up against the top-k launch: rows rel {err:.2e}")
    assert outs[0].shape == (1, 4, 64) and err < 1e-6


if __name__ == "__main__":
    from tests.common.test_triton_interpret import _setup

    _setup()
    {"moe_fp8": _group_moe_fp8, "moe_fp8_routed": _group_moe_fp8_routed}[sys.argv[1]]()
    print(f"OK {sys.argv[1]}")
