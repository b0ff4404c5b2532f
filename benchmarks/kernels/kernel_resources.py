"""The fused MoE's grouped GEMM compiled for sm_90 on any machine (no GPU, no device time):
warps, registers, spills, shared memory and the instruction mix of each config, from Triton's
compile and the bundled cuobjdump (common/ops/compile_report.py).

    python3 -m benchmarks.kernels.kernel_resources [--m 4096] [--configs FILE.json]

FILE.json maps a name to {"gated": bool, "BLOCK_M": int, "BLOCK_N": .., "BLOCK_K": .., "GROUP_M": ..,
"num_warps": .., "num_stages": .., "tma": .., "direct": .. (the one-token path), "K": .. (the reduction
length; a BLOCK_K that does not divide it compiles the masked K loop)}; without it, the shipped tables' entries nearest to --m
for GLM-4.5 + shared and GLM-4.5-Air + shared are compiled.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton

from common.ops import triton_moe as tm
from common.ops.compile_report import GEMM_ALIGNED, SASS_OPS, compile_sm90, gemm_signature, resources

TABLE_SHAPES = {"GLM-4.5+1": (161, 3072, 5120), "Air+1": (129, 2816, 4096)}  # E (with the shared), 2I, H


def _table_configs(m: int) -> dict[str, dict]:
    out = {}
    for name, (e, n2, h) in TABLE_SHAPES.items():
        table = tm.get_config(m, e, n2, h, 9, torch.bfloat16, torch.device("cpu"))
        for part, gated, k in (("up", True, h), ("down", False, n2 // 2)):
            out[f"table {part} ({name}, M={m})"] = {"gated": gated, "BLOCK_M": table["BLOCK_M"], "K": k,
                                                   "direct": m == 1, **table[part]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=4096, help="token count whose table entries are compiled")
    ap.add_argument("--configs", type=Path)
    args = ap.parse_args()
    configs = json.loads(args.configs.read_text()) if args.configs else _table_configs(args.m)
    print(f"triton {triton.__version__}, target sm_90")
    print("| config | warps | shared KB | regs | stack | local | " + " | ".join(SASS_OPS) + " |")
    print("|---|" + "---|" * (5 + len(SASS_OPS)))
    for name, c in configs.items():
        even_k = "K" not in c or c["K"] % c["BLOCK_K"] == 0
        sig, consts = gemm_signature(c["gated"], bool(c.get("direct")), c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"],
                                     c.get("GROUP_M", 8), bool(c.get("tma")), even_k)
        r = resources(compile_sm90(tm._moe_gemm_kernel, sig, consts, GEMM_ALIGNED, c["num_warps"], c["num_stages"]))
        print(f"| {name} | {r['warps']} | {r['shared_kb']:.0f} | {r.get('reg')} | {r.get('stack')} | {r.get('local')} | "
              + " | ".join(str(r[op]) for op in SASS_OPS) + " |", flush=True)


if __name__ == "__main__":
    main()
