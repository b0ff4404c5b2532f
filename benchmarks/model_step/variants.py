"""Named variants of the served kernels' launch choices, for timing the whole step against them in one
process (`bench_full_depth --ab NAME,...`).

A variant is a context manager that changes a module-level choice the model's ops read at launch
(so graphs captured inside it use the variant) and restores it on exit:

- `prefetch=MB`: the weight-prefetch budget of the few-token FP8 GEMMs (common/ops/pdl.py; 0: none);
- `quant-launch-old`: the per-token quantisers as launched before the blocks of at most 4096 values
  (a whole row in registers with up to 16 warps, no small programs for many short rows, the norm +
  quantiser with a whole row's warps at every row count);
- `attn-plan-old`: the paged attention's small-query tiles as chosen before the decode sweep (one
  row block of the rows' power of two, 64-slot tiles, 4 warps, 3 stages, KV split until twice the
  SMs' count of programs);
- `quant-in-gemm=R:T`: the few-token GEMMs quantise their own input up to R tokens (a linear of an
  unquantised activation, o_proj's: `cublas_fp8.QUANT_IN_GEMM_ROWS`) and the MoE's down GEMM its
  intermediate up to T tokens (`triton_moe_fp8.DOWN_QUANT_TOKENS`); 0:0 quantises every activation by a
  launch of its own;
- `fast-accum=R|never`: cuBLAS's FP8 projections accumulate without fp32 promotion from R tokens
  (`cublas_fp8.FAST_ACCUM_ROWS`; 0: every call, never: none);
- `rope-copy`: q rotated into a new tensor instead of in place (`triton_norm.ROPE_IN_PLACE` off);
- `combine-launch`: the FP8 MoE sums its rows by a launch of its own instead of handing them to the
  next norm (`moe.COMBINE_IN_NORM` off);
- `split-k-reduce`: o_proj's few-token split-K GEMM reduces its fp32 slices by a launch of its own
  instead of handing them to the next add + norm (`layers.SPLIT_K_IN_NORM` off);
- `amax-handoff=R`: up to R tokens o_proj's input is quantised from the head amaxes the attention's
  split merge hands over instead of by the quantiser's own launch (`layers.AMAX_HANDOFF_ROWS`; 0: none);
- `route-launch`: one token's FP8 MoE takes grouped_topk's launch before the fused MoE instead of
  routing inside its gate_up GEMM (`triton_moe_fp8.ROUTE_IN_GATE_UP` off);
- `rope-queries=Q`: batches of up to Q queries a sequence on small-query tiles norm and rotate the
  new q and k and store the K/V in the attention launch's prologue, larger ones by
  `qk_norm_rope_store`'s launch before it (`triton_paged.ROPE_IN_ATTENTION_QUERIES`; 0: every batch
  by the launch);
- `tiles-rule`: the few-token FP8 GEMMs ignore the tuned-tile table (`fp8_gemm_tuned.json`) and run
  `triton_fp8_gemm.default_config`'s tiles, as a GPU or shape without entries does;
- `tiles-file=FILE`: the few-token FP8 GEMMs take their tuned tiles from FILE (a copy of
  `fp8_gemm_tuned.json`, e.g. the one shipped before a sweep rewrote it) instead of the shipped table;
- `skip=experts|attn` (timing only; the model's output changes): every MoE block's experts (all but
  the router: routing, gate_up, quantiser, down), or every attention block, return zeros without a
  launch, so the step's time against the served one is what those kernels cost inside the step, PDL
  overlap and launch gaps included, to set beside their bytes floor;
- `attn-tiles=FILE`: the paged attention's (BLOCK_M, BLOCK_N, warps, stages, splits) for each
  (batch, rows a KV head) in FILE, as `tune_attention --decode --write FILE` writes it; other shapes
  keep plan()'s choice.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch

import common.model.layers as model_layers
import common.model.moe as moe_block
from common.attention import triton_paged
from common.model.glm4_moe import Glm4MoeAttention
from common.model.layers import Fp8Activation
from common.ops import cublas_fp8, pdl, triton_fp8, triton_fp8_gemm, triton_moe_fp8, triton_norm


def _prefetch(arg: str) -> contextlib.AbstractContextManager:
    return mock.patch.multiple(pdl, PREFETCH_BYTES=int(float(arg) * 1e6))


def _quant_launch_old(arg: str) -> contextlib.AbstractContextManager:
    never = 1 << 62
    return mock.patch.multiple(triton_fp8, TOKEN_BLOCK_MAX=16384, TOKEN_WARPS_MAX=16, MANY_ROWS=never, NORM_ROWS_8_WARPS=never)


def _attn_plan_old(arg: str) -> contextlib.AbstractContextManager:
    served = triton_paged.plan

    def plan(num_seqs: int, kv_heads: int, group: int, max_q: int, num_sms: int) -> tuple[int, ...]:
        rows = max_q * group
        if rows > 64:
            return served(num_seqs, kv_heads, group, max_q, num_sms)
        splits = min(64, max(1, -(-2 * num_sms // (num_seqs * kv_heads))))
        return max(16, 1 << (rows - 1).bit_length()), 64, 4, 3, splits

    return mock.patch.multiple(triton_paged, plan=plan)


def _quant_in_gemm(arg: str) -> contextlib.AbstractContextManager:
    rows, sep, tokens = arg.partition(":")
    if not (sep and rows.isdigit() and tokens.isdigit()):
        raise ValueError(f"quant-in-gemm takes ROWS:TOKENS (two counts, e.g. 0:0), not {arg!r}")
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.multiple(cublas_fp8, QUANT_IN_GEMM_ROWS=int(rows)))
    stack.enter_context(mock.patch.multiple(triton_moe_fp8, DOWN_QUANT_TOKENS=int(tokens)))
    return stack


def _fast_accum(arg: str) -> contextlib.AbstractContextManager:
    if not (arg.isdigit() or arg == "never"):
        raise ValueError(f"fast-accum takes a token count or 'never', not {arg!r}")
    return mock.patch.multiple(cublas_fp8, FAST_ACCUM_ROWS=1 << 62 if arg == "never" else int(arg))


def _rope_copy(arg: str) -> contextlib.AbstractContextManager:
    return mock.patch.multiple(triton_norm, ROPE_IN_PLACE=False)


def _combine_launch(arg: str) -> contextlib.AbstractContextManager:
    return mock.patch.multiple(moe_block, COMBINE_IN_NORM=False)


def _split_k_reduce(arg: str) -> contextlib.AbstractContextManager:
    return mock.patch.multiple(model_layers, SPLIT_K_IN_NORM=False)


def _amax_handoff(arg: str) -> contextlib.AbstractContextManager:
    if not arg.isdigit():
        raise ValueError(f"amax-handoff takes a token count, not {arg!r}")
    return mock.patch.multiple(model_layers, AMAX_HANDOFF_ROWS=int(arg))


def _route_launch(arg: str) -> contextlib.AbstractContextManager:
    return mock.patch.multiple(triton_moe_fp8, ROUTE_IN_GATE_UP=False)


def _rope_queries(arg: str) -> contextlib.AbstractContextManager:
    if not arg.isdigit():
        raise ValueError(f"rope-queries takes a query count, not {arg!r}")
    return mock.patch.multiple(triton_paged, ROPE_IN_ATTENTION_QUERIES=int(arg))


def _tiles_rule(arg: str) -> contextlib.AbstractContextManager:
    return mock.patch.multiple(triton_fp8_gemm, _tuned_entry=lambda m, n, k, device: None)


def _tiles_file(arg: str) -> contextlib.AbstractContextManager:
    tables = json.loads(Path(arg).read_text())["tables"]
    return mock.patch.multiple(triton_fp8_gemm, _tuned_tables=lambda: tables)


_ZEROS: dict[tuple, torch.Tensor] = {}


def _zeros_like_input(x: torch.Tensor | Fp8Activation) -> torch.Tensor:
    """Zeros of x's shape and dtype, for a skipped block to return (one buffer per shape, made on first
    use: no launch afterwards, and nothing in the step turns NaN)."""
    t = x.q if isinstance(x, Fp8Activation) else x  # (an Fp8Activation's dtype is its consumer's)
    key = (tuple(t.shape), x.dtype, t.device)
    if key not in _ZEROS:
        _ZEROS[key] = torch.zeros(t.shape, dtype=x.dtype, device=t.device)
    return _ZEROS[key]


def _skip(arg: str) -> contextlib.AbstractContextManager:
    # (class, forwards, index of the input x among their positional arguments)
    blocks = {"experts": (moe_block.Experts, ("forward", "forward_routed"), 0),
              "attn": (Glm4MoeAttention, ("forward",), 1)}
    if arg not in blocks:
        raise ValueError(f"skip takes one of {', '.join(blocks)}, not {arg!r}")
    return _skipped(*blocks[arg])


@contextlib.contextmanager
def _skipped(cls: type, attrs: tuple[str, ...], at: int) -> Iterator[None]:
    """The patches of `_skip`, applied on entry only (`parse` builds every variant to check it)."""
    with contextlib.ExitStack() as stack:
        for attr in attrs:
            stack.enter_context(mock.patch.object(cls, attr, lambda self, *a, **k: _zeros_like_input(a[at])))
        yield


def attention_tiles(path: str) -> dict[tuple[int, int], tuple[int, ...]]:
    """{(num_seqs, rows a KV head): (BM, BN, warps, stages, splits)} from a tune_attention --decode file."""
    entries = json.loads(Path(path).read_text())
    return {(int(e["num_seqs"]), int(e["rows"])): tuple(int(x) for x in e["tile"]) for e in entries}


def _attn_tiles(arg: str) -> contextlib.AbstractContextManager:
    tiles = attention_tiles(arg)
    served = triton_paged.plan

    def plan(num_seqs: int, kv_heads: int, group: int, max_q: int, num_sms: int) -> tuple[int, ...]:
        return tiles.get((num_seqs, max_q * group)) or served(num_seqs, kv_heads, group, max_q, num_sms)

    return mock.patch.multiple(triton_paged, plan=plan)


VARIANTS: dict[str, Callable[[str], contextlib.AbstractContextManager]] = {
    "prefetch": _prefetch, "quant-launch-old": _quant_launch_old, "attn-plan-old": _attn_plan_old,
    "attn-tiles": _attn_tiles, "quant-in-gemm": _quant_in_gemm, "fast-accum": _fast_accum, "rope-copy": _rope_copy,
    "combine-launch": _combine_launch, "split-k-reduce": _split_k_reduce,
    "tiles-rule": _tiles_rule, "tiles-file": _tiles_file, "route-launch": _route_launch, "rope-queries": _rope_queries,
    "amax-handoff": _amax_handoff, "skip": _skip}


def parse(spec: str) -> list[str]:
    """Variant names from 'a,b=x,...', each built once to check it (a bad name or value fails before any
    GPU work; building one changes nothing until it is entered)."""
    names = [s for s in spec.split(",") if s]
    for name in names:
        key, _, arg = name.partition("=")
        if key not in VARIANTS:
            raise SystemExit(f"--ab: unknown variant {key!r} (known: {', '.join(VARIANTS)})")
        if key in ("prefetch", "attn-tiles", "quant-in-gemm", "fast-accum", "amax-handoff", "skip",
                   "rope-queries") and not arg:
            raise SystemExit(f"--ab: {key} needs a value ({key}=...)")
        try:
            VARIANTS[key](arg)
        except ValueError as e:
            raise SystemExit(f"--ab: {name}: {e}") from e
    return names


def variant(name: str) -> contextlib.AbstractContextManager:
    key, _, arg = name.partition("=")
    return VARIANTS[key](arg)
