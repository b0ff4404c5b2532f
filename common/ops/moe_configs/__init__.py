"""Fused-MoE block configs: tuned tables (the JSON files beside this module, written on the GPU
by benchmarks/kernels/tune_moe.py; format in README.md) and the heuristic used where none exists.

Torch-only (no Triton import), so tools can read and write the tables anywhere.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent


def table_dtype(dtype: torch.dtype, fp8_block: int | None = None) -> str:
    """The dtype field of a table's name: the activation dtype for bf16 weights (triton_moe); for FP8
    weights (triton_moe_fp8) "fp8_w8a8" with per-channel scales (fp8_block 0) or "fp8_w8a8_block{b}"
    with b x b block scales."""
    if fp8_block is None:
        return str(dtype).replace("torch.", "")
    return "fp8_w8a8" if fp8_block == 0 else f"fp8_w8a8_block{fp8_block}"


def config_name(num_experts: int, n: int, hidden: int, dtype: torch.dtype, device_name: str,
                fp8_block: int | None = None) -> str:
    """File name of a tuned table; n = w13 rows (2*I), device_name as torch reports it, fp8_block as
    in table_dtype (None: the bf16 kernel)."""
    dt = table_dtype(dtype, fp8_block)
    return f"E={num_experts},N={n},H={hidden},dtype={dt},device={device_name.replace(' ', '_')}.json"


@functools.lru_cache(maxsize=64)
def _load_table(num_experts: int, n: int, hidden: int, dtype: torch.dtype, device_name: str,
                fp8_block: int | None) -> dict | None:
    exact = CONFIG_DIR / config_name(num_experts, n, hidden, dtype, device_name, fp8_block)
    pattern = config_name(num_experts, n, hidden, dtype, "*", fp8_block)
    for path in [exact, *sorted(CONFIG_DIR.glob(pattern))]:  # same shape from another device next
        if path.is_file():
            return {int(m): cfg for m, cfg in json.loads(path.read_text()).items() if m.isdigit()}
    return None


def default_config(m: int, num_experts: int, n: int, hidden: int, top_k: int, num_sms: int = 132) -> dict:
    """Heuristic when no tuned table exists. Decode (few rows per expert) is a weight stream: BM 16
    and the widest gate_up N tile that still gives ~2 programs per SM over the touched experts
    (TP slices get narrow tiles, long K steps). Prefill: 64x128 tiles for wgmma."""
    per_expert = m * top_k / num_experts
    inter = n // 2
    if per_expert <= 4:
        active = min(m * top_k, num_experts)
        bn_up = next((bn for bn in (64, 32) if active * -(-inter // bn) >= 2 * num_sms), 16)
        up = {"BLOCK_N": bn_up, "BLOCK_K": 128 if bn_up == 64 else 256, "GROUP_M": 1, "num_warps": 4,
              "num_stages": 4}
        return {"BLOCK_M": 16, "up": up,
                "down": {"BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}}
    if per_expert <= 32:
        return {"BLOCK_M": 32,
                "up": {"BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 4, "num_warps": 4, "num_stages": 4},
                "down": {"BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 4, "num_warps": 4, "num_stages": 4}}
    return {"BLOCK_M": 64,
            "up": {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3},
            "down": {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}}


def default_config_fp8(m: int, num_experts: int, n: int, hidden: int, top_k: int, block: int,
                       num_sms: int = 132) -> dict:
    """Heuristic for the FP8 kernel when no tuned table exists: default_config's tiles with the K step
    widened to the same bytes per weight-tile row (at decode up to 256 elements: a half-size element
    moves half the bytes); block scales fix BLOCK_K to the block."""
    cfg = default_config(m, num_experts, n, hidden, top_k, num_sms)
    decode = cfg["BLOCK_M"] == 16
    for part in ("up", "down"):
        cfg[part] = dict(cfg[part], BLOCK_K=block or (min(2 * cfg[part]["BLOCK_K"], 256) if decode else 128))
    return cfg


@functools.lru_cache(maxsize=8)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@functools.lru_cache(maxsize=8)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 for the CPU interpreter); grid sizing."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


MAX_TUNED_RATIO = 8  # a tuned entry serves token counts within this factor of its own


def nearest_tuned(keys: Iterable[int], m: int) -> int | None:
    """The tuned token count closest to m by ratio (tiles scale with the rows per expert, so 2048 is
    nearer 4096 than 64), or None when none is within MAX_TUNED_RATIO: a decode entry's tiles run a
    prefill-sized call several times slower than the heuristic."""
    m = max(m, 1)
    best = min(keys, key=lambda k: (abs(math.log(m / k)), k), default=None)
    if best is None or max(m / best, best / m) > MAX_TUNED_RATIO:
        return None
    return best


def get_config(m: int, num_experts: int, n: int, hidden: int, top_k: int, dtype: torch.dtype,
               device: torch.device, fp8_block: int | None = None) -> dict:
    """The tuned entry nearest to m for this shape, weight format and device (any device's table for
    the shape next; `nearest_tuned`), else default_config() (default_config_fp8() for FP8 weights)."""
    table = _load_table(num_experts, n, hidden, dtype, _device_name(device), fp8_block)
    key = nearest_tuned(table or {}, m)
    if key is not None:
        return table[key]
    if fp8_block is None:
        return default_config(m, num_experts, n, hidden, top_k, num_sms(device))
    return default_config_fp8(m, num_experts, n, hidden, top_k, fp8_block, num_sms(device))


__all__ = ["CONFIG_DIR", "MAX_TUNED_RATIO", "config_name", "default_config", "default_config_fp8", "get_config",
           "nearest_tuned", "num_sms",
           "table_dtype"]
