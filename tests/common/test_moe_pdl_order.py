"""Programmatic dependent launch in the fused MoE and the FP8 GEMMs: their kernels compiled for sm_90
(on the CPU, no GPU needed) must read nothing before griddepcontrol.wait (the previous kernel may
still be running) but their L2 weight prefetches (and, for the one-token down GEMM, the expert ids
that top-k wrote two launches back), and let the next kernel launch only after it. The GPU test (tests/gpu/test_kernels_gpu.py::
test_moe_pdl_equals_plain_launch) checks the results bit for bit against plain launches.
"""

from __future__ import annotations

import pytest

from common.ops import triton_fp8_gemm as tfg
from common.ops import triton_moe as tm
from common.ops import triton_moe_fp8 as tf8
from common.ops.compile_report import (
    FP8_GEMM_ALIGNED,
    GEMM_ALIGNED,
    compile_sm90,
    fp8_gemm_signature,
    gemm_signature,
    resources,
)

READS = ("ld.global", "cp.async", "prefetch.global")  # cp.async also matches the TMA bulk copies


def _ptx(fn, sig: dict, consts: dict, aligned: tuple, num_warps: int = 4) -> list[str]:  # type: ignore[no-untyped-def]
    return [line.strip() for line in compile_sm90(fn, sig, consts, aligned, num_warps).asm["ptx"].splitlines()]


def _first(lines: list[str], *needles: str) -> int:
    return next((i for i, line in enumerate(lines) if any(n in line for n in needles)), len(lines))


def _check_order(ptx: list[str], triggers: bool, early: tuple[str, ...] = ()) -> None:
    """Nothing read before the wait but the `early` instructions (the weight prefetches, and the
    expert ids two launches old), each of which must be there."""
    wait = _first(ptx, "griddepcontrol.wait")
    assert wait < len(ptx), "no griddepcontrol.wait"
    before = [line for line in ptx[:wait] if any(r in line for r in READS)]
    assert all(line.startswith(early) for line in before) if early else not before, \
        f"a global read before griddepcontrol.wait: {before}"
    for kind in early:
        assert any(line.startswith(kind) for line in before), f"no {kind} before the wait"
    trigger = _first(ptx, "griddepcontrol.launch_dependents")
    assert (trigger > wait) if triggers else trigger == len(ptx)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("even_k", [True, False])  # False: K = I of a TP slice, the masked K loop
def test_grouped_gemm_reads_nothing_before_the_wait(gated: bool, direct: bool, tma: bool, even_k: bool) -> None:
    _check_order(_gemm_ptx(gated, direct, tma, even_k), triggers=True)


def _gemm_ptx(gated: bool, direct: bool, tma: bool, even_k: bool) -> list[str]:
    bm, bn, bk = (16, 64, 128) if direct else (64, 64, 128)
    sig, consts = gemm_signature(gated, direct, bm, bn, bk, 1 if direct else 8, tma, even_k)
    return _ptx(tm._moe_gemm_kernel, sig, consts, GEMM_ALIGNED)


@pytest.mark.parametrize(("gated", "direct", "block", "quant", "swap", "tma", "even_k"), [
    (True, True, 0, False, False, False, True),  # decode gate_up, intermediate quantised by triton_fp8
    (False, True, 0, False, True, True, False),  # decode down, swapped operands, TMA weights, K tail
    (True, False, 0, True, True, False, False),  # TP-8 gate_up holding the whole row: quantised in its epilogue
    (True, False, 128, True, False, True, True),  # block scales, per-group quantisation in the epilogue
    (False, False, 128, False, False, False, True),  # block-scaled down
])
def test_fp8_gemm_reads_nothing_before_the_wait(gated: bool, direct: bool, block: int, quant: bool, swap: bool,
                                                tma: bool, even_k: bool) -> None:
    bm, bn, bk = (16, 64, 128) if direct else (64, 128 if block else 256, 128)
    sig, consts = fp8_gemm_signature(gated, direct, bm, bn, bk, block, quant, swap, tma, even_k)
    # one token: the shared expert's gate_up rows, and every expert's down rows (the ids read at L2
    # before the wait: written by top-k, two launches back), are asked of L2 early
    early = (("prefetch.global.L2",) if gated else ("prefetch.global.L2", "ld.global.cg")) if direct else ()
    _check_order(_ptx(tf8._moe_fp8_gemm_kernel, sig, consts, FP8_GEMM_ALIGNED), triggers=True, early=early)


def _fp8_linear_kernel(block: int, swap: bool, tma: bool):  # type: ignore[no-untyped-def]
    """The few-token channel / block GEMM compiled for sm_90 (split K 2, 16 x 64 tiles)."""
    names = ("a_ptr", "as_ptr", "b_ptr", "bs_ptr", "bias_ptr", "c_ptr", "M", "N", "K", "k_per_split",
             "early_programs", "stride_am", "stride_bn", "stride_cm", "stride_asm", "stride_ask", "stride_bsn",
             "stride_bsk")
    sig = dict(zip(names, ("*fp8e4nv", "*fp32", "*fp8e4nv", "*fp32", "*fp32", "*fp32") + ("i32",) * 12, strict=True))
    consts = {"BLOCK_SCALES": block > 0, "HAS_BIAS": False, "SPLIT_K": 2, "BLOCK_M": 16, "BLOCK_N": 64,
              "BLOCK_K": 128, "GROUP_M": 1, "PDL": True, "SWAP": swap, "TMA": tma}
    if tma:
        sig["b_desc"] = "tensordesc<fp8e4nv[64, 128]>"
    else:
        consts["b_desc"] = None
    aligned = ("a_ptr", "as_ptr", "b_ptr", "bs_ptr", "bias_ptr", "c_ptr", "N", "K", "k_per_split", "stride_am",
               "stride_bn", "stride_cm")
    return compile_sm90(tfg._fp8_gemm_kernel, sig, consts, aligned)


@pytest.mark.parametrize("block", [0, 128])
@pytest.mark.parametrize(("swap", "tma"), [(False, False), (True, False), (True, True)])
def test_fp8_linear_prefetches_its_weights_and_reads_nothing_else_before_the_wait(block: int, swap: bool,
                                                                                   tma: bool) -> None:
    ptx = [line.strip() for line in _fp8_linear_kernel(block, swap, tma).asm["ptx"].splitlines()]
    _check_order(ptx, triggers=True, early=("prefetch.global.L2",))


@pytest.mark.parametrize(("swap", "tma"), [(False, False), (True, False), (True, True)])
def test_fp8_linear_swapped_tile_is_a_warpgroup_fp8_mma(swap: bool, tma: bool) -> None:
    """At 16 token rows the plain tile is an mma.sync on values upcast to f16 (HMMA); swapped, the weight
    rows fill the 64-row side and the MMA is FP8 on the warpgroup (QGMMA); TMA loads the weight tiles
    in bulk (UTMALDG), leaving per-thread async copies to the activation tile."""
    res = resources(_fp8_linear_kernel(0, swap, tma))
    assert (res["QGMMA"] > 0, res["HMMA"] > 0) == ((True, False) if swap else (False, True)), res
    assert (res["UTMALDG"] > 0) == tma, res


def test_combine_reads_nothing_before_the_wait() -> None:
    sig = {"y_ptr": "*bf16", "out_ptr": "*bf16", "H": "i32"}
    consts = {"TOPK": 9, "BH": 1024, "PDL": True}
    _check_order(_ptx(tm._combine_kernel, sig, consts, ("y_ptr", "out_ptr", "H")), triggers=True)

