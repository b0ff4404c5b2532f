"""Every Triton kernel on the forward path is a programmatic dependent (common/ops/pdl.py): it takes
a `PDL` constexpr, its first statement is `pdl_start(PDL)` (nothing read or written before the
wait), and each of its launches passes the PDL keywords. Checked on the source, so no GPU is needed;
tests/common/test_moe_pdl_order.py checks the compiled order for the fused MoE, and
tests/gpu/test_fp8_model_gpu.py that a whole forward gives the same bits either way.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORWARD_KERNELS = {
    "common/ops/triton_fp8.py": ["_quant_per_token_kernel", "_quant_per_group_kernel", "_norm_quant_kernel",
                                 "_silu_quant_token_kernel", "_silu_quant_group_kernel"],
    "common/ops/triton_fp8_gemm.py": ["_fp8_gemm_kernel", "_split_k_reduce"],
    "common/ops/triton_norm.py": ["_rms_norm_kernel", "_qk_norm_rope_kernel", "_silu_and_mul_kernel"],
    "common/ops/triton_router.py": ["_router_mma_kernel"],
    "common/ops/triton_moe.py": ["_grouped_topk_kernel", "_router_kernel", "_align_count_kernel", "_align_sort_kernel",
                                 "_align_scatter_kernel", "_moe_gemm_kernel", "_combine_kernel"],
    "common/ops/triton_moe_fp8.py": ["_moe_fp8_gemm_kernel"],
    "common/attention/triton_paged.py": ["_paged_attn_kernel", "_merge_splits_kernel"],
}


def _kernels(path: str) -> dict[str, ast.FunctionDef]:
    tree = ast.parse((ROOT / path).read_text())
    return {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)
            and any("jit" in ast.unparse(d) for d in f.decorator_list)}


# kernels that ask L2 for their weights before the wait: index arithmetic and prefetch_rows only
# (and the one-token down GEMM's expert ids); test_moe_pdl_order.py checks their compiled order
PREFETCHING = {"_fp8_gemm_kernel", "_moe_fp8_gemm_kernel"}


@pytest.mark.parametrize("path", list(FORWARD_KERNELS))
def test_forward_kernels_start_with_the_wait(path: str) -> None:
    kernels = _kernels(path)
    for name in FORWARD_KERNELS[path]:
        fn = kernels[name]
        assert "PDL" in [a.arg for a in fn.args.args], f"{name} takes no PDL constexpr"
        body = fn.body[1:] if isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant) \
            else fn.body
        if name not in PREFETCHING:
            assert ast.unparse(body[0]) == "pdl_start(PDL)", f"{name} does something before pdl_start(PDL)"
            continue
        start = [ast.unparse(stmt) for stmt in body].index("pdl_start(PDL)")
        before = "\n".join(ast.unparse(stmt) for stmt in body[:start])
        assert "tl.store" not in before and "atomic" not in before, f"{name} writes before pdl_start(PDL)"
        loads = re.findall(r"tl\.load\([^\n]*", before)
        assert all("cache_modifier='.cg'" in load and "block_expert_ptr" in load for load in loads), \
            f"{name} reads more than the expert ids before pdl_start(PDL): {loads}"
        assert "prefetch_rows(" in before, f"{name} is listed as prefetching but asks L2 for nothing"


@pytest.mark.parametrize("path", list(FORWARD_KERNELS))
def test_every_launch_passes_the_pdl_keywords(path: str) -> None:
    text = (ROOT / path).read_text()
    for name in FORWARD_KERNELS[path]:
        launches = [m.start() for m in re.finditer(rf"\b{name}\[", text)]
        assert launches, f"{name} is never launched in {path}"
        for start in launches:
            call = text[start:text.index("\n\n", start)]
            assert "pdl_kwargs(" in call or ("PDL=" in call and "launch_pdl=" in call), \
                f"a launch of {name} in {path} does not pass the PDL keywords"
