"""Custom ops with backend dispatch: the torch reference everywhere, Triton twins on CUDA.

Every op has the signature pinned in docs/CONTRACTS.md. On CUDA tensors the CUDA twin (Triton, from
`common/ops/triton_*.py`; the channel FP8 GEMM, from `cublas_fp8.py`) is used when that module imports
(lazily, once) and defines the op; otherwise, and always on CPU or inside `use_reference()`, the
pure-torch twin in `reference.py`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch

from common.ops import reference

BACKENDS = ("auto", "reference")

# op name -> the CUDA module expected to define it
_TRITON_MODULE = {
    "rms_norm": "triton_norm",
    "fused_add_rms_norm": "triton_norm",
    "qk_norm_rope": "triton_norm",
    "qk_norm_rope_store": "triton_norm",
    "grouped_topk": "triton_moe",
    "router_logits": "triton_moe",
    "silu_and_mul": "triton_norm",
    "fused_moe": "triton_moe",
    "fused_moe_fp8": "triton_moe_fp8",
    "routed_moe_fp8": "triton_moe_fp8",
    "store_kv": "triton_kv",
    "quant_fp8_per_token": "triton_fp8",
    "quant_fp8_per_group": "triton_fp8",
    "rms_norm_quant_fp8": "triton_fp8",
    "fused_add_rms_norm_quant_fp8": "triton_fp8",
    "silu_and_mul_quant_fp8": "triton_fp8",
    "fp8_linear": "cublas_fp8",
    "fp8_block_linear": "triton_fp8_gemm",
    "fp8_linear_dynamic": "cublas_fp8",
    "apply_token_bitmask": "triton_bitmask",
}

_backend = "auto"
_modules: dict[str, ModuleType | None] = {}


def set_backend(name: str) -> None:
    """"auto": Triton on CUDA when available; "reference": the torch twins always."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown ops backend {name!r}; choose one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextmanager
def use_reference() -> Iterator[None]:
    """Run the ops in this scope with the torch reference (restores the previous backend)."""
    previous = _backend
    set_backend("reference")
    try:
        yield
    finally:
        set_backend(previous)


def _triton_module(name: str) -> ModuleType | None:
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"common.ops.{name}")
        except ImportError:
            _modules[name] = None
    return _modules[name]


def resolve(op: str, device: torch.device) -> Callable[..., Any]:
    """The implementation of `op` that a call on `device` would run."""
    if _backend == "auto" and device.type == "cuda":
        module = _triton_module(_TRITON_MODULE[op])
        fn = getattr(module, op, None) if module is not None else None
        if fn is not None:
            return fn
    return getattr(reference, op)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return resolve("rms_norm", x.device)(x, w, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return resolve("fused_add_rms_norm", x.device)(x, residual, w, eps)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    rotary_dim: int,
    q_norm_w: torch.Tensor | None,
    k_norm_w: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return resolve("qk_norm_rope", q.device)(q, k, positions, cos_sin, rotary_dim, q_norm_w, k_norm_w, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return resolve("silu_and_mul", gate_up.device)(gate_up)


def router_logits(x: torch.Tensor, w: torch.Tensor, partial: bool = False) -> torch.Tensor:
    return resolve("router_logits", x.device)(x, w, partial)


def qk_norm_rope_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    rotary_dim: int,
    q_norm_w: torch.Tensor | None,
    k_norm_w: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> torch.Tensor:
    return resolve("qk_norm_rope_store", q.device)(q, k, v, positions, cos_sin, rotary_dim, q_norm_w, k_norm_w, eps,
                                                   k_cache, v_cache, slots)


def grouped_topk(
    router_logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scaling: float,
    num_shared: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    return resolve("grouped_topk", router_logits.device)(
        router_logits, correction_bias, top_k, n_group, topk_group, renormalize, scaling, num_shared
    )


def fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    return resolve("fused_moe", x.device)(x, w13, w2, weights, ids)


def fused_moe_fp8(
    x: torch.Tensor,
    w13: torch.Tensor,
    s13: torch.Tensor,
    w2: torch.Tensor,
    s2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    block: int = 0,
    x_quant: tuple[torch.Tensor, torch.Tensor] | None = None,
    num_shared: int = 0,
    combine: bool = True,
) -> torch.Tensor:
    """num_shared: the last ids columns are fused shared experts (the last experts of w13 / w2),
    known before routing; the GPU kernels start on their weights early (same result). combine=False:
    the per-assignment rows [T,k,H], for the next fused_add_rms_norm(_quant_fp8) to sum."""
    return resolve("fused_moe_fp8", x.device)(x, w13, s13, w2, s2, weights, ids, block, x_quant, num_shared,
                                              combine)


def routed_moe_fp8(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    routing: reference.Routing,
    w13: torch.Tensor,
    s13: torch.Tensor,
    w2: torch.Tensor,
    s2: torch.Tensor,
    block: int = 0,
    x_quant: tuple[torch.Tensor, torch.Tensor] | None = None,
    combine: bool = True,
) -> torch.Tensor:
    """grouped_topk(router_logits, *routing) then fused_moe_fp8: the FP8 MoE block from the router's
    logits (the GPU twin routes one token inside the fused MoE, one launch fewer)."""
    return resolve("routed_moe_fp8", x.device)(x, router_logits, routing, w13, s13, w2, s2, block, x_quant, combine)


def store_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    resolve("store_kv", k.device)(k_cache, v_cache, k, v, slots)


def quant_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return resolve("quant_fp8_per_token", x.device)(x)


def quant_fp8_per_group(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    return resolve("quant_fp8_per_group", x.device)(x, group)


def fp8_linear(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """On CUDA, cublas_fp8.fp8_linear decides per call between cuBLAS and the reference twin."""
    return resolve("fp8_linear", x_q.device)(x_q, x_scale, w_q, w_scale, bias, out_dtype)


def rms_norm_quant_fp8(
    x: torch.Tensor, w: torch.Tensor, eps: float, group: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    return resolve("rms_norm_quant_fp8", x.device)(x, w, eps, group)


def fused_add_rms_norm_quant_fp8(
    x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float, group: int = 0, keep_normed: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    return resolve("fused_add_rms_norm_quant_fp8", x.device)(x, residual, w, eps, group, keep_normed)


def silu_and_mul_quant_fp8(gate_up: torch.Tensor, group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return resolve("silu_and_mul_quant_fp8", gate_up.device)(gate_up, group)


def fp8_block_linear(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    block: int = 128,
) -> torch.Tensor:
    """On CUDA, triton_fp8_gemm.fp8_block_linear decides per call between cuBLAS and its Triton kernel."""
    return resolve("fp8_block_linear", x_q.device)(x_q, x_scale, w_q, w_scale, bias, out_dtype, block)


def fp8_linear_dynamic(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    block: int = 0,
    unsummed: bool = False,
    x_amax: torch.Tensor | None = None,
) -> torch.Tensor:
    """On CUDA, cublas_fp8.fp8_linear_dynamic: the quantiser, then fp8_linear / fp8_block_linear's paths
    (optionally the few-token Triton GEMM quantising x itself). unsummed, x_amax: see the reference twin."""
    return resolve("fp8_linear_dynamic", x.device)(x, w_q, w_scale, bias, out_dtype, block, unsummed, x_amax)


__all__ = [
    "fp8_block_linear", "fp8_linear", "fp8_linear_dynamic", "fused_add_rms_norm", "fused_add_rms_norm_quant_fp8", "fused_moe",
    "fused_moe_fp8", "get_backend", "grouped_topk", "qk_norm_rope", "qk_norm_rope_store", "quant_fp8_per_group",
    "quant_fp8_per_token", "resolve", "rms_norm", "rms_norm_quant_fp8", "routed_moe_fp8", "router_logits", "set_backend",
    "silu_and_mul", "silu_and_mul_quant_fp8", "store_kv", "use_reference",
]


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    return resolve("apply_token_bitmask", logits.device)(logits, bitmask)
