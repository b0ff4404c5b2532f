"""The fused MoE's grouped GEMM compiled for sm_90 on any machine (no GPU, no device time):
warps, registers, spills, shared memory and the instruction mix of each config, from Triton's
compile and the bundled cuobjdump.

    python benchmarks/kernel_resources.py [--bm 128] [--configs FILE.json]

FILE.json maps a name to {"gated": bool, "BLOCK_M": int, "BLOCK_N": .., "BLOCK_K": .., "num_warps": ..,
"num_stages": .., "tma": .., "a_tma": .., "ws": ..}; without it, bench_moe_blocked.py's variants at
--bm and the GLM-4.5 + shared table's M = 4096 entry are compiled. tests/common/test_moe_pdl_order.py
uses compile_sm90 / gemm_signature for its PTX checks.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from common.ops import triton_moe as tm

# _moe_gemm_kernel's runtime arguments, their types, and the ones a launch specialises as divisible by 16
GEMM_ARGS = ("a_ptr", "a_desc", "w_ptr", "w_desc", "out_ptr", "sorted_ptr", "block_expert_ptr", "topw_ptr", "NUMEL",
             "N", "K", "MAX_BLOCKS", "stride_am", "stride_we", "stride_wn", "stride_om")
GEMM_TYPES = ("*bf16", "constexpr", "*bf16", "constexpr", "*bf16", "*i32", "*i32", "*fp32") + ("i32",) * 8
GEMM_ALIGNED = ("a_ptr", "w_ptr", "out_ptr", "sorted_ptr", "block_expert_ptr", "topw_ptr", "N", "K", "stride_am",
                "stride_we", "stride_wn", "stride_om")
SASS_OPS = ("HGMMA", "UTMALDG", "LDGSTS", "LDG", "STG", "USETMAXREG")
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_sm90(fn, sig: dict, consts: dict, aligned: tuple, num_warps: int = 4, num_stages: int = 3):  # type: ignore[no-untyped-def]
    """triton.compile of fn for sm_90 with PDL launches: sig maps runtime args to types, consts the
    constexpr values, aligned the args specialised as divisible by 16."""
    names = list(sig)
    sig = sig | {k: "constexpr" for k in consts}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages, "launch_pdl": True})


def gemm_signature(gated: bool, direct: bool, bm: int, bn: int, bk: int, group_m: int = 8, tma: bool = False,
                   a_tma: bool = False, ws: bool = False) -> tuple[dict, dict]:
    """(sig, consts) of one _moe_gemm_kernel specialisation (bf16, EVEN_K, PDL on)."""
    consts = {"a_desc": None, "w_desc": None, "A_DIV": 9 if gated else 1, "GATED": gated, "MUL_W": not gated,
              "EVEN_K": True, "BM": bm, "BN": bn, "BK": bk, "GROUP_M": group_m, "TMA": tma, "DIRECT": direct,
              "PDL": True, "SORTED_OUT": False, "A_TMA": a_tma, "WS": ws}
    sig = dict(zip(GEMM_ARGS, GEMM_TYPES, strict=True))
    for name, on, tile in (("w_desc", tma, (bn, bk)), ("a_desc", a_tma, (bm, bk))):
        if on:
            sig[name] = f"tensordesc<bf16[{tile[0]}, {tile[1]}]>"
            del consts[name]
    return sig, consts


def resources(kernel) -> dict:  # type: ignore[no-untyped-def]
    """Warps, shared bytes, registers / stack / local bytes per thread and SASS op counts."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        usage = subprocess.run([str(_BIN / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([str(_BIN / "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)
    out = {"warps": kernel.metadata.num_warps, "shared_kb": kernel.metadata.shared / 1024}
    out |= {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", usage)}
    counts = collections.Counter(m.group(1) for m in re.finditer(r"\b(" + "|".join(SASS_OPS) + r")\b", sass))
    return out | {op: counts[op] for op in SASS_OPS}


def _default_configs(bm: int) -> dict[str, dict]:
    from bench_moe_blocked import _down_variants, _up_variants

    from common.ops.moe_configs import get_config

    table = get_config(4096, 161, 3072, 5120, 9, torch.bfloat16, torch.device("cpu"))
    out = {"table gate_up (GLM-4.5+1, M=4096)": {"gated": True, "BLOCK_M": table["BLOCK_M"], **table["up"]},
           "table down (GLM-4.5+1, M=4096)": {"gated": False, "BLOCK_M": table["BLOCK_M"], **table["down"]}}
    for name, cfg, _ in _up_variants(table["up"])[1:]:
        out[f"gate_up {name}"] = {"gated": True, "BLOCK_M": bm, **cfg}
    for name, cfg in _down_variants(table["down"])[2:]:
        out[f"down {name}"] = {"gated": False, "BLOCK_M": bm, **cfg}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bm", type=int, default=128)
    ap.add_argument("--configs", type=Path)
    args = ap.parse_args()
    configs = json.loads(args.configs.read_text()) if args.configs else _default_configs(args.bm)
    print(f"triton {triton.__version__}, target sm_90")
    print("| config | warps | shared KB | regs | stack | local | " + " | ".join(SASS_OPS) + " |")
    print("|---|" + "---|" * (5 + len(SASS_OPS)))
    for name, c in configs.items():
        sig, consts = gemm_signature(c["gated"], False, c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c.get("GROUP_M", 8),
                                     bool(c.get("tma")), bool(c.get("a_tma")), bool(c.get("ws")))
        r = resources(compile_sm90(tm._moe_gemm_kernel, sig, consts, GEMM_ALIGNED, c["num_warps"], c["num_stages"]))
        print(f"| {name} | {r['warps']} | {r['shared_kb']:.0f} | {r.get('reg')} | {r.get('stack')} | {r.get('local')} | "
              + " | ".join(str(r[op]) for op in SASS_OPS) + " |", flush=True)


if __name__ == "__main__":
    main()
