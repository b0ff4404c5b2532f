"""Programmatic dependent launch in the fused MoE: its kernels compiled for sm_90 (on the CPU, no GPU
needed) must read nothing before griddepcontrol.wait (the previous kernel may still be running) and
let the next kernel launch only after it. The GPU test (tests/gpu/test_kernels_gpu.py::
test_moe_pdl_equals_plain_launch) checks the results bit for bit against plain launches.
"""

from __future__ import annotations

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from common.ops import triton_moe as tm

ARGS = ("a_ptr", "a_desc", "w_ptr", "w_desc", "out_ptr", "sorted_ptr", "block_expert_ptr", "topw_ptr", "NUMEL", "N", "K",
        "MAX_BLOCKS", "stride_am", "stride_we", "stride_wn", "stride_om")
TYPES = ("*bf16", "constexpr", "*bf16", "constexpr", "*bf16", "*i32", "*i32", "*fp32") + ("i32",) * 8
ALIGNED = ("a_ptr", "w_ptr", "out_ptr", "sorted_ptr", "block_expert_ptr", "topw_ptr", "N", "K", "stride_am",
           "stride_we", "stride_wn", "stride_om")  # what a launch specialises as divisible by 16
READS = ("ld.global", "cp.async", "prefetch.global")  # cp.async also matches the TMA bulk copies


def _ptx(fn, sig: dict, consts: dict, aligned: tuple, num_stages: int = 3, num_warps: int = 4) -> list[str]:
    names = list(sig)
    sig = sig | {k: "constexpr" for k in consts}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages, "launch_pdl": True})
    return [line.strip() for line in kernel.asm["ptx"].splitlines()]


def _first(lines: list[str], *needles: str) -> int:
    return next((i for i, line in enumerate(lines) if any(n in line for n in needles)), len(lines))


def _check_order(ptx: list[str], triggers: bool) -> None:
    wait = _first(ptx, "griddepcontrol.wait")
    assert wait < len(ptx), "no griddepcontrol.wait"
    assert _first(ptx, *READS) > wait, "a global read before griddepcontrol.wait"
    trigger = _first(ptx, "griddepcontrol.launch_dependents")
    assert (trigger > wait) if triggers else trigger == len(ptx)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("tma", [False, True])
def test_grouped_gemm_reads_nothing_before_the_wait(gated: bool, direct: bool, tma: bool) -> None:
    _check_order(_gemm_ptx(gated, direct, tma), triggers=True)


@pytest.mark.parametrize("gated", [True, False])
def test_warp_specialised_gemm_reads_nothing_before_the_wait(gated: bool) -> None:
    """Both operands by TMA in one producer warp group, two consumer groups (the "ws" configs)."""
    ptx = _gemm_ptx(gated, False, True, a_tma=True, ws=True)
    assert any("setmaxnreg" in line for line in ptx), "the loop was not warp-specialised"
    _check_order(ptx, triggers=True)


def _gemm_ptx(gated: bool, direct: bool, tma: bool, a_tma: bool = False, ws: bool = False) -> list[str]:
    bm, bn, bk = (16, 64, 128) if direct else (64, 64, 128)
    consts = {"a_desc": None, "w_desc": None, "A_DIV": 8 if gated else 1, "GATED": gated, "MUL_W": not gated,
              "EVEN_K": True, "BM": bm, "BN": bn, "BK": bk, "GROUP_M": 1 if direct else 8, "TMA": tma,
              "DIRECT": direct, "PDL": True, "SORTED_OUT": False, "A_TMA": a_tma, "WS": ws}
    sig = dict(zip(ARGS, TYPES))
    for name, on, tile in (("w_desc", tma, (bn, bk)), ("a_desc", a_tma, (bm, bk))):
        if on:
            sig[name] = f"tensordesc<bf16[{tile[0]}, {tile[1]}]>"
            del consts[name]
    return _ptx(tm._moe_gemm_kernel, sig, consts, ALIGNED, num_warps=4)


def test_combine_reads_nothing_before_the_wait() -> None:
    sig = {"y_ptr": "*bf16", "out_ptr": "*bf16", "H": "i32"}
    consts = {"TOPK": 9, "BH": 1024, "PDL": True}
    _check_order(_ptx(tm._combine_kernel, sig, consts, ("y_ptr", "out_ptr", "H")), triggers=False)


def test_row_gather_reads_nothing_before_the_wait() -> None:
    sig = {"x_ptr": "*bf16", "out_ptr": "*bf16", "sorted_ptr": "*i32", "block_expert_ptr": "*i32", "NUMEL": "i32",
           "H": "i32", "stride_x": "i32", "stride_o": "i32"}
    consts = {"A_DIV": 9, "BM": 128, "BH": 512, "PDL": True}
    _check_order(_ptx(tm._gather_rows_kernel, sig, consts, ("x_ptr", "out_ptr", "sorted_ptr", "block_expert_ptr", "H",
                                                            "stride_x", "stride_o")), triggers=True)
