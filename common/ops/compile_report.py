"""The fused MoE's kernels compiled for sm_90 on any machine (no GPU): PTX for order checks, and
warps, registers, spills, shared memory and the SASS instruction mix of a grouped-GEMM config
(bf16: triton_moe; FP8: triton_moe_fp8, whose tensor-core ops show as QGMMA, or HMMA after an
upcast).

tests/common/test_moe_pdl_order.py reads the PTX; benchmarks/kernels/kernel_resources.py prints the
resources of the shipped tables' entries.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# _moe_gemm_kernel's runtime arguments, their types, and the ones a launch specialises as divisible by 16
GEMM_ARGS = ("a_ptr", "w_ptr", "w_desc", "out_ptr", "sorted_ptr", "block_expert_ptr", "topw_ptr", "NUMEL", "N", "K",
             "MAX_BLOCKS", "stride_am", "stride_we", "stride_wn", "stride_om")
GEMM_TYPES = ("*bf16", "*bf16", "constexpr", "*bf16", "*i32", "*i32", "*fp32") + ("i32",) * 8
GEMM_ALIGNED = ("a_ptr", "w_ptr", "out_ptr", "sorted_ptr", "block_expert_ptr", "topw_ptr", "N", "K", "stride_am",
                "stride_we", "stride_wn", "stride_om")
# _moe_fp8_gemm_kernel's runtime arguments (types by fp8_gemm_signature)
FP8_GEMM_ARGS = ("a_ptr", "as_ptr", "w_ptr", "w_desc", "ws_ptr", "out_ptr", "os_ptr", "sorted_ptr", "block_expert_ptr",
                 "topw_ptr", "NUMEL", "N", "K", "MAX_BLOCKS", "stride_am", "stride_as", "stride_we", "stride_wn",
                 "stride_wse", "stride_wsn", "stride_om", "stride_os", "early_programs", "num_experts", "first_slot")
FP8_GEMM_ALIGNED = ("a_ptr", "as_ptr", "w_ptr", "ws_ptr", "out_ptr", "os_ptr", "sorted_ptr", "block_expert_ptr",
                    "topw_ptr", "N", "K", "stride_am", "stride_we", "stride_wn", "stride_om")
SASS_OPS = ("HGMMA", "QGMMA", "HMMA", "UTMALDG", "LDGSTS", "LDG", "STG")
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_sm90(fn: Any, sig: dict, consts: dict, aligned: tuple, num_warps: int = 4,
                 num_stages: int = 3) -> Any:
    """triton.compile of the jitted fn for sm_90 with PDL launches: sig maps runtime args to types,
    consts the constexpr values, aligned the args specialised as divisible by 16."""
    names = list(sig)
    sig = sig | {k: "constexpr" for k in consts}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages, "launch_pdl": True})


def gemm_signature(gated: bool, direct: bool, bm: int, bn: int, bk: int, group_m: int = 8,
                   tma: bool = False, even_k: bool = True) -> tuple[dict, dict]:
    """(sig, consts) of one _moe_gemm_kernel specialisation: bf16, PDL on, A_DIV 9 (top-8 plus the
    shared expert) for gate_up."""
    consts = {"w_desc": None, "A_DIV": 9 if gated else 1, "GATED": gated, "MUL_W": not gated, "EVEN_K": even_k,
              "BM": bm, "BN": bn, "BK": bk, "GROUP_M": group_m, "TMA": tma, "DIRECT": direct, "PDL": True}
    sig = dict(zip(GEMM_ARGS, GEMM_TYPES, strict=True))
    if tma:
        sig["w_desc"] = f"tensordesc<bf16[{bn}, {bk}]>"
        del consts["w_desc"]
    return sig, consts


def fp8_gemm_signature(gated: bool, direct: bool, bm: int, bn: int, bk: int, block: int = 0, quant: bool = False,
                       swap: bool = False, tma: bool = False, even_k: bool = True) -> tuple[dict, dict]:
    """(sig, consts) of one _moe_fp8_gemm_kernel specialisation: bf16 intermediate, PDL on, A_DIV 9
    for gate_up; block 0: per-channel scales; quant: gate_up writes e4m3 codes and their scales."""
    import triton.language as tl

    out = "*fp8e4nv" if gated and quant else "*bf16" if gated else "*fp32"
    types = ("*fp8e4nv", "*fp32", "*fp8e4nv", "constexpr", "*fp32", out, "*fp32", "*i32", "*i32", "*fp32") + ("i32",) * 15
    sig = dict(zip(FP8_GEMM_ARGS, types, strict=True))
    consts = {"w_desc": None, "A_DIV": 9 if gated else 1, "GATED": gated, "QUANT": gated and quant,
              "ACT": tl.bfloat16, "BLOCKWISE": block > 0, "GROUP": max(block, 1), "EVEN_K": even_k, "BM": bm, "BN": bn,
              "BK": bk, "GROUP_M": 1 if direct else 8, "TMA": tma, "DIRECT": direct, "SWAP": swap, "PDL": True,
              "QMAX": 448.0, "FLOOR": 2.0**-30, "IDS_READY": not gated}
    if tma:
        sig["w_desc"] = f"tensordesc<fp8e4nv[{bn}, {bk}]>"
        del consts["w_desc"]
    return sig, consts


def resources(kernel: Any) -> dict:
    """Warps, shared KB, registers / stack / local bytes per thread and SASS op counts of a compiled
    kernel (the cuobjdump bundled with Triton)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        usage = _cuobjdump("--dump-resource-usage", f.name)
        sass = _cuobjdump("-sass", f.name)
    finally:
        os.unlink(f.name)
    out = {"warps": kernel.metadata.num_warps, "shared_kb": kernel.metadata.shared / 1024}
    out |= {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", usage)}
    counts = collections.Counter(m.group(1) for m in re.finditer(r"\b(" + "|".join(SASS_OPS) + r")\b", sass))
    return out | {op: counts[op] for op in SASS_OPS}


def _cuobjdump(flag: str, path: str) -> str:
    return subprocess.run([str(_BIN / "cuobjdump"), flag, path], capture_output=True, text=True, check=True).stdout


__all__ = ["FP8_GEMM_ALIGNED", "FP8_GEMM_ARGS", "GEMM_ALIGNED", "GEMM_ARGS", "GEMM_TYPES", "SASS_OPS", "compile_sm90",
           "fp8_gemm_signature", "gemm_signature", "resources"]
